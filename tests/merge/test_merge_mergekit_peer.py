"""slimtorch merge against mergekit 0.1.5 itself (bench environment): the same YAML, the same bits.

Runs mergekit's ``mergekit-pytorch`` command in this process on small safetensors models and
compares every output tensor with ``slimtorch merge``'s. Install mergekit into the bench
environment with ``pip install --no-deps mergekit==0.1.5 immutables==0.21 peft==0.21.2``.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from slimtorch.merge import methods as M
from slimtorch.merge.mergekit import parse_config
from slimtorch.merge.stream import merge_to_dir

pytestmark = pytest.mark.slow
NAMES = ("base", "a", "b", "c")


def _model(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    base = torch.Generator().manual_seed(0)
    shapes = {"fc1.weight": (24, 16), "fc1.bias": (24,), "fc2.weight": (8, 24), "norm": (8,)}
    out = {}
    for name, shape in shapes.items():  # fine-tunes: the base plus a small change
        out[name] = torch.randn(shape, generator=base) + 0.1 * torch.randn(shape, generator=g)
    out["step"] = torch.tensor([3])
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("mk")
    for i, name in enumerate(NAMES):
        save_file(_model(i), str(tmp / f"{name}.safetensors"))
    return tmp


def _cfg(tmp: Path, method: str, n: int, base: bool, model_params: Any = None, **glob: Any) -> Any:
    models = []
    for i, name in enumerate(NAMES[1 : n + 1]):
        entry: dict[str, Any] = {"model": str(tmp / f"{name}.safetensors")}
        params = model_params(i) if callable(model_params) else model_params
        if params:
            entry["parameters"] = params
        models.append(entry)
    cfg: dict[str, Any] = {"merge_method": method, "models": models}
    if base:
        cfg["base_model"] = str(tmp / "base.safetensors")
    if glob.pop("dtype", None):
        cfg["dtype"] = "bfloat16"
    if glob:
        cfg["parameters"] = glob
    return cfg


def _cases(tmp: Path) -> dict[str, Any]:
    w = {"weight": 1.0}
    return {
        "model_stock": _cfg(tmp, "model_stock", 3, True),
        "model_stock filter_wise": _cfg(tmp, "model_stock", 2, True, filter_wise=True),
        "nuslerp": _cfg(tmp, "nuslerp", 2, False, lambda i: {"weight": [0.3, 0.7][i]}),
        "nuslerp base row_wise": _cfg(
            tmp, "nuslerp", 2, True, w, nuslerp_row_wise=True, nuslerp_flatten=False
        ),
        "nuslerp columns bf16": _cfg(tmp, "nuslerp", 2, False, w, nuslerp_flatten=False, dtype=1),
        "multislerp": _cfg(tmp, "multislerp", 3, False, lambda i: {"weight": 1.0 + i}),
        "multislerp base": _cfg(tmp, "multislerp", 3, True, w),
        "karcher": _cfg(tmp, "karcher", 3, False),
        "karcher bf16": _cfg(tmp, "karcher", 2, False, dtype=1),
        "sce": _cfg(tmp, "sce", 3, True),
        "sce topk 0.3": _cfg(tmp, "sce", 3, True, select_topk=0.3),
        "arcee_fusion": _cfg(tmp, "arcee_fusion", 1, True),
        "arcee_fusion bf16": _cfg(tmp, "arcee_fusion", 1, True, dtype=1),
        "passthrough scale": _cfg(tmp, "passthrough", 1, False, {"scale": 0.5}),
    }


def _mergekit(cfg_path: Path, out: Path) -> dict[str, torch.Tensor]:
    main = pytest.importorskip("mergekit.scripts.merge_raw_pytorch").main
    args = [str(cfg_path), str(out), "--no-cuda", "--quiet", "--random-seed", "0"]
    with contextlib.redirect_stderr(io.StringIO()):
        main.main(args, standalone_mode=False)
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(out.glob("*.safetensors")):
        tensors |= load_file(str(f))
    return tensors


@pytest.mark.parametrize("case", sorted(_cases(Path("/")).keys()))
def test_bit_identical_to_mergekit(models: Path, case: str) -> None:
    cfg = _cases(models)[case]
    path = models / f"{case.replace(' ', '-')}.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    theirs = _mergekit(path, models / f"mk-{path.stem}")
    out = models / f"st-{path.stem}"
    merge_to_dir(parse_config(cfg), out, force=True, seed=0)
    ours = load_file(str(out / "model.safetensors"))
    assert set(ours) == set(theirs)
    for name in ours:
        assert ours[name].dtype == theirs[name].dtype, name
        assert torch.equal(ours[name], theirs[name]), (case, name)


@pytest.mark.parametrize("linear", [False, True])
def test_della_magprune_same_draws_as_mergekit(linear: bool) -> None:
    sparsify = pytest.importorskip("mergekit.sparsify")
    delta = torch.randn(12, 20, generator=torch.Generator().manual_seed(5))
    torch.manual_seed(7)  # mergekit draws from the global generator
    theirs = sparsify.della_magprune(delta, 0.4, 0.2, sparsify.RescaleNorm.l1)
    ours = M.della_magprune(delta, 0.4, 0.2, torch.Generator().manual_seed(7), "l1")
    assert torch.equal(ours, theirs)
    vec = delta[0]
    torch.manual_seed(8)
    theirs = sparsify.della_magprune(vec, 0.5, 0.1, None if linear else sparsify.RescaleNorm.l1)
    ours = M.della_magprune(
        vec, 0.5, 0.1, torch.Generator().manual_seed(8), None if linear else "l1"
    )
    assert torch.equal(ours, theirs)


def _with_tokenizer(root: Path) -> None:
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({f"t{i}": i for i in range(64)}, "t0"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0")
    for name in ("a", "b"):
        fast.save_pretrained(root / name)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_frankenmerge_bit_identical_to_mergekit_yaml(tmp_path: Path, dtype: str) -> None:
    from test_merge_slices import frankenmerge, tiny_llama_dirs

    run_yaml = pytest.importorskip("mergekit.scripts.run_yaml").main
    tiny_llama_dirs(tmp_path)
    _with_tokenizer(tmp_path)
    cfg = frankenmerge(tmp_path, dtype=dtype)
    path = tmp_path / "f.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    with contextlib.redirect_stderr(io.StringIO()):
        run_yaml.main(
            [str(path), str(tmp_path / "mk"), "--no-cuda", "--quiet"], standalone_mode=False
        )
    merge_to_dir(parse_config(cfg), tmp_path / "st", force=True)
    theirs = load_file(str(tmp_path / "mk" / "model.safetensors"))
    ours = load_file(str(tmp_path / "st" / "model.safetensors"))
    assert set(ours) == set(theirs) and len(ours) == 2 + 6 * 9 + 1
    for name in ours:
        assert ours[name].dtype == theirs[name].dtype and torch.equal(ours[name], theirs[name])
    for f in ("config.json",):
        mk, st = (json.loads((tmp_path / d / f).read_text()) for d in ("mk", "st"))
        assert mk["num_hidden_layers"] == st["num_hidden_layers"] == 6
    assert (tmp_path / "st" / "tokenizer.json").is_file()


def test_extract_lora_bit_identical_to_mergekit(tmp_path: Path) -> None:
    from test_merge_slices import tiny_llama_dirs

    from slimtorch.merge.lora import extract_lora

    main = pytest.importorskip("mergekit.scripts.extract_lora").main
    tiny_llama_dirs(tmp_path)
    _with_tokenizer(tmp_path)
    args = ["--model", str(tmp_path / "b"), "--base-model", str(tmp_path / "a"), "--no-cuda"]
    args += ["--out-path", str(tmp_path / "mk"), "--max-rank", "4", "--quiet"]
    with contextlib.redirect_stderr(io.StringIO()):
        main.main(args, standalone_mode=False)
    extract_lora(str(tmp_path / "a"), str(tmp_path / "b"), tmp_path / "st", rank=4)
    theirs = load_file(str(tmp_path / "mk" / "adapter_model.safetensors"))
    ours = load_file(str(tmp_path / "st" / "adapter_model.safetensors"))
    assert set(ours) == set(theirs) and len(ours) == 67
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    mk, st = (json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("mk", "st"))
    for key in ("target_modules", "modules_to_save"):
        assert sorted(mk[key]) == st[key]
    assert {k: v for k, v in mk.items() if k not in ("target_modules", "modules_to_save")} == {
        k: v for k, v in st.items() if k not in ("target_modules", "modules_to_save")
    }
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    model = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "a")
    merged = peft.PeftModel.from_pretrained(model, tmp_path / "st").merge_and_unload()
    assert merged(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 64)


@pytest.mark.parametrize(
    "tokenizer",
    [
        {"tokenizer_source": "union"},
        {"tokenizer_source": "base"},
        {"tokenizer": {"source": "union", "pad_to_multiple_of": 32}},
        {
            "tokenizer": {
                "source": "union",
                "tokens": {
                    "t3": {"source": "B", "force": True},
                    "u0": {"source": {"kind": "zero"}},
                },
            }
        },
    ],
    ids=["union", "base", "padded", "tokens"],
)
@pytest.mark.parametrize("method", ["linear", "task_arithmetic"])
def test_vocabulary_union_same_rows_as_mergekit(
    tmp_path: Path, tokenizer: dict[str, Any], method: str
) -> None:
    """tokenizer_source union/base/tokens/padding: every token's rows equal mergekit's (mergekit
    numbers the tokens a union adds in a per-process hash order, so rows are compared by token)."""
    from test_merge_vocab import two_vocab_models, union_config

    run_yaml = pytest.importorskip("mergekit.scripts.run_yaml").main
    transformers = pytest.importorskip("transformers")
    two_vocab_models(tmp_path)
    cfg = union_config(
        tmp_path,
        **json.loads(json.dumps(tokenizer).replace('"B"', json.dumps(str(tmp_path / "b")))),
    )
    if "tokenizer" in tokenizer:
        del cfg["tokenizer_source"]
    cfg["merge_method"] = method
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    with contextlib.redirect_stderr(io.StringIO()):
        run_yaml.main(
            [str(path), str(tmp_path / "mk"), "--no-cuda", "--quiet"], standalone_mode=False
        )
    merge_to_dir(parse_config(cfg), tmp_path / "st", force=True)
    vocabs = {
        d: transformers.AutoTokenizer.from_pretrained(tmp_path / d).get_vocab()
        for d in ("mk", "st")
    }
    assert set(vocabs["mk"]) == set(vocabs["st"])
    theirs = load_file(str(tmp_path / "mk" / "model.safetensors"))
    ours = load_file(str(tmp_path / "st" / "model.safetensors"))
    assert set(ours) == set(theirs)
    n = len(vocabs["st"])
    for name in ours:
        if "embed" not in name and "lm_head" not in name:
            assert torch.equal(ours[name], theirs[name]), name
            continue
        assert ours[name].shape == theirs[name].shape, name
        for token, i in vocabs["st"].items():
            assert torch.equal(ours[name][i], theirs[name][vocabs["mk"][token]]), (name, token)
        # padding rows: the mean of the token rows, summed in a different row order
        assert torch.allclose(ours[name][n:], theirs[name][n:], rtol=0, atol=1e-6), name
    mk, st = (json.loads((tmp_path / d / "config.json").read_text()) for d in ("mk", "st"))
    assert mk["vocab_size"] == st["vocab_size"]


@pytest.mark.parametrize(
    "mode", ["hidden", "hidden_avg", "cheap_embed", "random", "uniform_random"]
)
def test_moe_bit_identical_to_mergekit_moe(tmp_path: Path, mode: str) -> None:
    """`slimtorch moe` and mergekit-moe on the same YAML: every tensor and the config equal
    (random routers: mergekit draws from the global generator, seeded here as ours is)."""
    from test_merge_moe import moe_config, moe_models

    from slimtorch.workflows.moe import build_moe

    main = pytest.importorskip("mergekit.scripts.moe").main
    moe_models(tmp_path)
    path = tmp_path / "moe.yaml"
    cfg = moe_config(tmp_path, mode)
    cfg["experts"][0]["negative_prompts"] = ["t60 t61"]
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    torch.manual_seed(3)
    with contextlib.redirect_stderr(io.StringIO()):
        main.main([str(path), str(tmp_path / "mk"), "--no-cuda", "--quiet"], standalone_mode=False)
    build_moe(path, tmp_path / "st", seed=3)
    theirs = load_file(str(tmp_path / "mk" / "model.safetensors"))
    ours = load_file(str(tmp_path / "st" / "model.safetensors"))
    assert set(ours) == set(theirs)
    for name in ours:
        assert ours[name].dtype == theirs[name].dtype and torch.equal(ours[name], theirs[name]), (
            name
        )
    mk, st = (json.loads((tmp_path / d / "config.json").read_text()) for d in ("mk", "st"))
    assert {k: v for k, v in mk.items() if k != "transformers_version"} == {
        k: v for k, v in st.items() if k != "transformers_version"
    }
