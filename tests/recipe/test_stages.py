"""Registration that cannot be forgotten: every recipe stage is found, named after its folder, has
a recipe round-trip, and works on a tiny model, checked for every registered method at once.

Nothing here lists methods, except the few that cannot run alone on a tiny model
(:data:`NOT_ON_A_TINY_MODEL`, each with its reason; they still get their round-trip) and the one
whose result a model factory cannot rebuild (:data:`FACTORY_CANNOT_REBUILD`, not saved).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from pydantic import ValidationError
from torch import nn

import slimtorch as st
from slimtorch.core import methods as core_methods
from slimtorch.core.context import Context
from slimtorch.core.errors import UserInputError
from slimtorch.core.methods import METHODS, PREFIX_ALIASES, STAGES, MethodSpec, stage_modules
from slimtorch.recipe.recipe import parse_recipe, parse_stage
from slimtorch.testing.models import (
    example_input,
    tiny_cnn,
    tiny_llama,
    tiny_lstm,
    tiny_resnet,
    tiny_stack,
    tiny_transformer,
    with_example_input,
)
from slimtorch.testing.tasks import logits_of, tensor_task

PKG = Path(__file__).resolve().parents[2] / "src" / "slimtorch"
NAMES = METHODS.names()  # every registered method (the registry discovers them all first)
TINY = (tiny_cnn, tiny_stack, tiny_transformer, tiny_lstm, tiny_resnet, tiny_llama)  # cheap first

_OTHER_MODELS = "merges the checkpoints its `models` name, which a tiny model has none of"
NOT_ON_A_TINY_MODEL = {
    "merge.linear": f"{_OTHER_MODELS} (tests/merge/test_merge_stage.py runs it)",
    "merge.slerp": f"{_OTHER_MODELS} (tests/merge/test_merge_stage.py runs it)",
    "merge.task_arithmetic": f"{_OTHER_MODELS} (tests/merge/test_merge_stage.py runs it)",
    "merge.ties": f"{_OTHER_MODELS} (tests/merge/test_merge_stage.py runs it)",
    "merge.dare": f"{_OTHER_MODELS} (tests/merge/test_merge_stage.py runs it)",
    "merge.della": f"{_OTHER_MODELS} (tests/merge/test_merge_extra.py runs it)",
    "merge.model_stock": f"{_OTHER_MODELS} (tests/merge/test_merge_extra.py runs it)",
    "merge.nuslerp": f"{_OTHER_MODELS} (tests/merge/test_merge_extra.py runs it)",
    "merge.multislerp": f"{_OTHER_MODELS} (tests/merge/test_merge_extra.py runs it)",
    "merge.karcher": f"{_OTHER_MODELS} (tests/merge/test_merge_extra.py runs it)",
    "merge.sce": f"{_OTHER_MODELS} (tests/merge/test_merge_extra.py runs it)",
    "merge.arcee_fusion": f"{_OTHER_MODELS} (tests/merge/test_merge_extra.py runs it)",
    "share.finetune": "trains the codebooks of an earlier share.kmeans stage and refuses alone"
    " (tests/share/test_share_codebook.py runs the pair)",
    "prune.experts": "removes experts of mixture-of-experts layers, which no model here has"
    " (tests/prune/test_experts.py runs it on tiny_moe, saved, loaded and exported)",
    "train.slimmable": "trains the widths an earlier prune.reorder stage recorded and refuses"
    " alone (tests/prune/test_slimmable.py runs the pair)",
}
# works on a tiny model, but its result cannot be rebuilt from the tiny model's factory
FACTORY_CANNOT_REBUILD = {
    "distill.shrink": "removes layers, which a model factory builds again (a Hugging Face model"
    " records its new layer count: tests/distill/test_distill_student.py saves and loads one)",
    "prune.layers": "removes blocks, which a model factory builds again (a Hugging Face model"
    " records its new layer count: tests/prune/test_layers.py saves and loads one)",
}


def _stage_files() -> list[str]:
    """The module names of every file in a stages location, from the directory tree alone."""
    names = []
    for path in sorted(PKG.glob(f"*/{STAGES}.py")) + sorted(PKG.glob(f"*/{STAGES}/**/*.py")):
        parts = path.relative_to(PKG.parent).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def test_load_methods_imports_every_stage_file_and_nothing_else() -> None:
    code = (
        "import json, sys; import slimtorch; before = set(sys.modules);"
        "from slimtorch.recipe.recipe import load_methods; load_methods();"
        "print(json.dumps([sorted(before), sorted(sys.modules)]))"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    before, after = (set(x) for x in json.loads(out.stdout))
    files = _stage_files()
    assert len(files) >= 7 and all(f.startswith("slimtorch.") for f in files)
    assert not [m for m in before if f".{STAGES}" in m], "import slimtorch imported a stage"
    assert [f for f in files if f not in after] == [], "stage files load_methods missed"
    assert "slimtorch.zoo" not in after  # only the packages that have stages are imported
    assert stage_modules() == sorted(files, key=lambda n: n.split("."))


def test_a_stage_file_dropped_into_a_package_is_found(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = {
        "fakeroot/__init__.py": "",
        "fakeroot/tech/__init__.py": "",
        "fakeroot/tech/maths.py": "raise AssertionError('a maths module was imported')",
        "fakeroot/tech/stages/__init__.py": "",
        "fakeroot/tech/stages/new_family.py": "",
        "fakeroot/tech/stages/more/__init__.py": "",
        "fakeroot/tech/stages/more/deep.py": "",
        "fakeroot/small/__init__.py": "",
        "fakeroot/small/stages.py": "",
        "fakeroot/bundled/__init__.py": "raise AssertionError('a package without stages')",
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [m for m in sys.modules if m.startswith("fakeroot")]:
        monkeypatch.delitem(sys.modules, name)
    found = stage_modules("fakeroot")
    imported = [m for m in sys.modules if m.startswith("fakeroot")]
    sys.modules.pop("fakeroot", None)
    assert imported == ["fakeroot"]  # found on disk: no subpackage imported
    assert found == [
        "fakeroot.small.stages",
        "fakeroot.tech.stages",
        "fakeroot.tech.stages.more",
        "fakeroot.tech.stages.more.deep",
        "fakeroot.tech.stages.new_family",
    ]


def _register_calls(path: Path) -> list[int]:
    tree = ast.parse(path.read_text())
    return [
        node.lineno
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and (getattr(node.func, "id", None) or getattr(node.func, "attr", None))
        == "register_method"
    ]


def _in_stages(module_or_path: str) -> bool:
    parts = module_or_path.removesuffix(".py").replace("/", ".").split(".")
    return STAGES in parts


def test_every_register_method_call_is_in_a_stages_module() -> None:
    calls = {p.relative_to(PKG).as_posix(): _register_calls(p) for p in PKG.rglob("*.py")}
    outside = [f"{p}:{line}" for p, lines in calls.items() if not _in_stages(p) for line in lines]
    assert outside == [], "register_method outside a stages module (move it to <pkg>/stages)"
    assert sum(len(lines) for lines in calls.values()) == len(NAMES)
    assert [n for n in NAMES if not _in_stages(METHODS.get(n).apply.__module__)] == []


def test_every_prefix_is_its_folder_or_a_documented_alias() -> None:
    wrong = []
    for name in NAMES:
        spec = METHODS.get(name)
        if spec.prefix != spec.folder and spec.folder not in PREFIX_ALIASES.get(spec.prefix, ()):
            wrong.append(f"{name} (in {spec.folder}/)")
    assert wrong == [], "rename the method, or add its prefix to core.methods.PREFIX_ALIASES"
    used = {(METHODS.get(n).prefix, METHODS.get(n).folder) for n in NAMES}
    stale = [(p, f) for p, folders in PREFIX_ALIASES.items() for f in folders if (p, f) not in used]
    assert stale == []
    doc = str(core_methods.__doc__)
    assert all(
        f"``{p}``" in doc and all(f"``{f}``" in doc for f in fs) for p, fs in PREFIX_ALIASES.items()
    )
    assert not set(PREFIX_ALIASES) & {p.name for p in PKG.iterdir() if p.is_dir()}


def test_the_exceptions_are_registered_methods() -> None:
    assert set(NOT_ON_A_TINY_MODEL) | set(FACTORY_CANNOT_REBUILD) <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_recipe_round_trip(name: str) -> None:
    spec = METHODS.get(name)
    try:
        spec.config.model_validate({})
        defaults_parse = True
    except ValidationError:
        defaults_parse = False
    assert defaults_parse == (not spec.example), (
        "register_method(example=...) gives exactly the options a minimal stage needs beyond"
        " the defaults: none when the defaults parse"
    )
    stage = parse_stage({"method": name, **spec.example}, 0)
    again = parse_stage(yaml.safe_load(yaml.safe_dump(stage.to_dict())), 0)
    assert again.spec is spec and again.config == stage.config
    assert again.to_dict() == stage.to_dict()
    full = {"method": name, **stage.config.model_dump(mode="json")}  # every option written out
    assert parse_stage(full, 0).config == stage.config
    recipe = parse_recipe({"stages": [stage.to_dict()]})
    assert parse_recipe(yaml.safe_load(recipe.to_yaml())).to_dict() == recipe.to_dict()


def _quick(options: dict[str, Any], steps: int, nested: bool = False) -> dict[str, Any]:
    """The options with every nested training loop cut to ``steps`` and calibration sets small."""
    small = {"steps": steps, "batch_size": 8, "samples": 8, "batches": 2}
    out = {}
    for key, value in options.items():
        if isinstance(value, dict):
            value = _quick(value, steps, nested=True)
        elif nested and key in small and isinstance(value, int):
            value = min(value, small[key])
        out[key] = value
    return out


def _stage(spec: MethodSpec) -> dict[str, Any]:
    """The method's example stage, made quick: the fewest training steps its config accepts
    (prune.gradual's steps must outlast its pruning schedule)."""
    full = spec.config.model_validate(spec.example).model_dump(mode="json")
    for steps in (2, 8, 32, 128, 512):
        quick = _quick(full, steps)
        try:
            spec.config.model_validate(quick)
        except ValidationError:
            continue
        return {"method": spec.name, **quick}
    return {"method": spec.name, **spec.example}


def _try(spec: MethodSpec, factory: Any, tmp_path: Path) -> str | None:
    """None when ``spec`` works on ``factory()``'s model (and the result saves and loads to the
    same outputs), else the message of the slimtorch error it refused with."""
    model = with_example_input(factory())
    x = example_input(model, batch=16)
    with torch.no_grad():
        before = logits_of(model(x))
    labels = before.argmax(-1)
    task = tensor_task(x, loss="next_token") if before.dim() == 3 else tensor_task(x, labels)
    try:
        result = st.compress(model, [_stage(spec)], data=task, ctx=Context(progress=False))
    except UserInputError as exc:  # a refusal that names the problem: fine on some models
        return f"{factory.__name__}: {exc}"
    out: nn.Module = result.model.eval()
    with torch.no_grad():
        after = logits_of(out(x))
    assert after.shape == before.shape and bool(torch.isfinite(after).all()), factory.__name__
    if spec.name in FACTORY_CANNOT_REBUILD:
        return None
    path = tmp_path / f"{spec.name}-{factory.__name__}"
    st.save(out, path)
    with torch.no_grad():
        loaded = logits_of(st.load(path, model=factory).eval()(x))
    torch.testing.assert_close(loaded, after, msg=f"{factory.__name__}: saved and loaded differ")
    return None


def _contract(name: str, tmp_path: Path, every_model: bool) -> None:
    spec = METHODS.get(name)
    refusals = []
    for factory in TINY:
        refusal = _try(spec, factory, tmp_path)
        if refusal is None and not every_model:
            return
        refusals.append(refusal)
    assert None in refusals, f"{name} works on no tiny model:\n" + "\n".join(
        textwrap.shorten(str(r), 300) for r in refusals
    )


CONTRACT = [n for n in NAMES if n not in NOT_ON_A_TINY_MODEL]


@pytest.mark.parametrize("name", CONTRACT)
def test_contract_on_a_tiny_model(name: str, tmp_path: Path) -> None:
    """Through st.compress, on the tiny models in turn until one works: the stage gives a model
    with the same output shape, finite, that saves and loads to the same outputs; on the models
    before it, it refuses with a slimtorch error that names the problem (never a crash)."""
    _contract(name, tmp_path, every_model=False)


@pytest.mark.slow
@pytest.mark.parametrize("name", CONTRACT)
def test_contract_on_every_tiny_model(name: str, tmp_path: Path) -> None:
    """The same on every tiny model: it works or refuses cleanly on each, and works on one."""
    _contract(name, tmp_path, every_model=True)
