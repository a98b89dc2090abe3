"""Loading an artifact never imports or calls a name the file holds (docs/artifact.md: the threat
model): a ``factory`` architecture needs ``model=`` or ``trust_factory=True``."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

import slimtorch as st
from slimtorch.core.errors import ArtifactError, UserInputError
from slimtorch.core.info import model_info, update_info
from slimtorch.formats.artifact import write_artifact
from slimtorch.models.registry import rebuild
from slimtorch.testing.models import example_input, tiny_cnn

EVIL_MODULE = "slimtorch_evil_factory"
EVIL_SOURCE = """
from pathlib import Path
MARKER = Path(__file__).with_name("imported")
MARKER.write_text("imported")

def boom():
    MARKER.with_name("called").write_text("called")
    raise SystemExit("factory was called")
"""


def _manifest(path: Path, architecture: dict, metadata: dict | None = None) -> Path:
    """A consistent artifact (checksums and all) of tiny_cnn's weights with ``architecture``."""
    manifest = {"architecture": architecture, "modules": [], "metadata": metadata or {}}
    write_artifact(path, tiny_cnn().state_dict(), {}, manifest)
    return path


@pytest.fixture
def abort_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    calls: list[tuple] = []
    monkeypatch.setattr(os, "abort", lambda *a: calls.append(a))
    return calls


def test_os_abort_ref_is_refused_and_never_called(tmp_path: Path, abort_calls: list) -> None:
    art = _manifest(tmp_path / "a", {"kind": "factory", "ref": "os:abort"})
    with pytest.raises(UserInputError) as err:
        st.load(art)
    message = str(err.value)
    assert "'os:abort'" in message
    assert "model=" in message and "--model package.module:factory" in message
    assert "trust_factory=True" in message and "--trust-factory" in message
    with pytest.raises(UserInputError, match="os:abort"):
        rebuild({"kind": "factory", "ref": "os:abort"})
    assert abort_calls == []


def test_cli_eval_of_an_os_abort_manifest_exits_2(
    tmp_path: Path, abort_calls: list, capsys: pytest.CaptureFixture[str]
) -> None:
    from slimtorch.cli.main import main

    art = _manifest(tmp_path / "a", {"kind": "factory", "ref": "os:abort"})
    assert main(["eval", str(art), "--no-baseline"]) == 2
    assert "os:abort" in capsys.readouterr().err
    assert abort_calls == []


def test_named_module_is_not_even_imported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    code = tmp_path / "code"
    code.mkdir()
    (code / f"{EVIL_MODULE}.py").write_text(EVIL_SOURCE)
    monkeypatch.syspath_prepend(str(code))
    monkeypatch.delitem(sys.modules, EVIL_MODULE, raising=False)
    art = _manifest(tmp_path / "a", {"kind": "factory", "ref": f"{EVIL_MODULE}:boom"})
    with pytest.raises(UserInputError, match=EVIL_MODULE):
        st.load(art)
    assert EVIL_MODULE not in sys.modules
    assert not (code / "imported").exists() and not (code / "called").exists()
    with pytest.raises(SystemExit, match="factory was called"):  # opting in does run it
        st.load(art, trust_factory=True)
    assert (code / "called").exists()
    monkeypatch.delitem(sys.modules, EVIL_MODULE, raising=False)


def test_trust_factory_loads_a_legit_factory(tmp_path: Path) -> None:
    model = st.compress(tiny_cnn(), "int8").model
    manifest = st.save(model, tmp_path / "a")
    assert manifest["architecture"] == {
        "kind": "factory",
        "ref": "slimtorch.testing.models:TinyCNN",
    }
    x = example_input(model)
    with torch.no_grad():
        assert torch.equal(st.load(tmp_path / "a", trust_factory=True)(x), model(x))


def test_model_argument_loads_without_trust(tmp_path: Path, abort_calls: list) -> None:
    model = st.compress(tiny_cnn(), "int4").model
    st.save(model, tmp_path / "a")
    x = example_input(model)
    fresh = tiny_cnn()
    with torch.no_grad():
        assert torch.equal(st.load(tmp_path / "a", model=tiny_cnn)(x), model(x))
        loaded = st.load(tmp_path / "a", model=fresh)
        assert loaded is fresh  # filled in place: its weights are the artifact's
        assert torch.equal(loaded(x), model(x))
    # the model passed stands for the architecture whatever the manifest names
    evil = _manifest(tmp_path / "evil", {"kind": "factory", "ref": "os:abort"})
    assert isinstance(st.load(evil, model=tiny_cnn), torch.nn.Module)
    assert abort_calls == []


def test_model_argument_must_give_a_module(tmp_path: Path) -> None:
    st.save(tiny_cnn(), tmp_path / "a")
    with pytest.raises(UserInputError, match="zero-argument callable"):
        st.load(tmp_path / "a", model=lambda: "not a module")  # type: ignore[arg-type,return-value]
    with pytest.raises(UserInputError, match=r"load_model\(spec\)\.model"):
        st.load(tmp_path / "a", model="os:abort")  # type: ignore[arg-type]
    with pytest.raises(ArtifactError, match="does not fit its architecture"):
        st.load(tmp_path / "a", model=torch.nn.Linear(2, 2))


def test_builtin_architecture_loads_without_trust(tmp_path: Path) -> None:
    from slimtorch.models import load_model

    loaded = load_model("builtin:lenet300-fashion")
    update_info(loaded.model, architecture=loaded.architecture)
    st.save(loaded.model, tmp_path / "a")
    x = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(st.load(tmp_path / "a")(x), loaded.model(x))


def test_hf_architecture_loads_without_trust(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    from slimtorch.testing.models import tiny_llama

    model = tiny_llama()
    st.save(model, tmp_path / "a")
    ids = torch.randint(0, 32, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(st.load(tmp_path / "a")(ids).logits, model(ids).logits)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"class": "os"}, "unknown Hugging Face model class 'os'"),
        ({"class": "os.system"}, "unknown Hugging Face model class"),
        ({"class": "PreTrainedModel.__subclasses__"}, "unknown Hugging Face model class"),
        ({"attn_implementation": "kernels-community/flash-attn"}, "attn_implementation"),
        ({"attn_implementation": "flash_attention_2"}, "attn_implementation"),
    ],
)
def test_hf_architecture_names_no_code(tmp_path: Path, change: dict, match: str) -> None:
    """A ``hf`` spec resolves its class in transformers only and runs only torch's attention:
    another kernel name could fetch and run code from the Hub."""
    pytest.importorskip("transformers")
    from slimtorch.models.hf import from_config
    from slimtorch.testing.models import tiny_llama

    arch = dict(model_info(tiny_llama()).architecture or {})
    with pytest.raises(UserInputError, match=match):
        from_config({**arch, **change})
