"""Hugging Face directory adapter: load -> architecture spec -> rebuild gives the same model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from slimtorch.core.errors import UserInputError  # noqa: E402
from slimtorch.models import hf  # noqa: E402
from slimtorch.models.registry import load_model, rebuild  # noqa: E402
from slimtorch.testing.models import tiny_bert  # noqa: E402
from slimtorch.zoo.minilm import model_dir  # noqa: E402


def _tiny_bert(path: Path) -> None:
    tiny_bert().save_pretrained(path)  # type: ignore[operator]


def _tiny_llama(path: Path) -> None:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=101,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)


def _round_trip(path: Path) -> tuple[torch.Tensor, torch.Tensor, dict]:
    loaded = hf.load_directory(path)
    spec = json.loads(json.dumps(loaded.architecture))  # plain JSON
    rebuilt = hf.from_config(spec)
    rebuilt.load_state_dict(loaded.model.state_dict(), strict=True)
    assert loaded.example_inputs is not None
    inputs = loaded.example_inputs(2)
    with torch.no_grad():
        a, b = loaded.model(*inputs)[0], rebuilt(*inputs)[0]
    return a, b, spec


def test_bert_round_trip(tmp_path: Path) -> None:
    _tiny_bert(tmp_path)
    a, b, spec = _round_trip(tmp_path)
    assert spec["kind"] == "hf" and spec["class"] == "BertModel"
    assert spec["config"]["hidden_size"] == 32
    assert a.shape == (2, 64, 32)
    assert torch.equal(a, b)


def test_causal_lm_round_trip(tmp_path: Path) -> None:
    _tiny_llama(tmp_path)
    a, b, spec = _round_trip(tmp_path)
    assert spec["class"] == "LlamaForCausalLM"
    assert a.shape == (2, 128, 101)  # logits; example inputs are capped at 128 tokens
    assert torch.equal(a, b)


def test_rebuild_has_no_trained_weights(tmp_path: Path) -> None:
    _tiny_bert(tmp_path)
    loaded = hf.load_directory(tmp_path)
    fresh = rebuild(loaded.architecture)  # through the registry's dispatch
    w0 = loaded.model.state_dict()["encoder.layer.0.attention.self.query.weight"]
    w1 = fresh.state_dict()["encoder.layer.0.attention.self.query.weight"]
    assert w0.shape == w1.shape and not torch.equal(w0, w1)
    assert not fresh.training


def test_load_model_dispatches_directories(tmp_path: Path) -> None:
    _tiny_bert(tmp_path)
    loaded = load_model(str(tmp_path))
    assert type(loaded.model).__name__ == "BertModel" and loaded.source == str(tmp_path)


def test_minilm_package_directory() -> None:
    loaded = hf.load_directory(model_dir())
    assert loaded.architecture["class"] == "BertModel"
    assert loaded.architecture["dtype"] == "float32"
    n = sum(p.numel() for p in loaded.model.parameters())
    assert 22_000_000 < n < 23_000_000


def test_not_a_model_directory(tmp_path: Path) -> None:
    with pytest.raises(UserInputError, match=r"no config\.json"):
        hf.load_directory(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(UserInputError, match="not valid JSON"):
        hf.load_directory(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "no-such-model"}))
    with pytest.raises(UserInputError, match="model_type"):
        hf.load_directory(tmp_path)


def test_config_without_weights(tmp_path: Path) -> None:
    transformers.BertConfig(hidden_size=32, num_attention_heads=4).save_pretrained(tmp_path)
    with pytest.raises(UserInputError, match=r"model\.safetensors"):
        hf.load_directory(tmp_path)


def test_bad_architecture_specs(tmp_path: Path) -> None:
    _tiny_bert(tmp_path)
    spec = hf.read_architecture(tmp_path)
    with pytest.raises(UserInputError, match="unknown Hugging Face model class 'NoSuchModel'"):
        hf.from_config({**spec, "class": "NoSuchModel"})
    with pytest.raises(UserInputError, match="model_type 'zzz'"):
        hf.from_config({**spec, "config": {**spec["config"], "model_type": "zzz"}})
    with pytest.raises(UserInputError, match="'config'"):
        hf.from_config({"kind": "hf", "class": "BertModel"})
    with pytest.raises(UserInputError, match="dtype"):
        hf.from_config({**spec, "dtype": "float99"})


def test_pickled_weights_are_refused_and_loading_prints_no_progress_bar(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import transformers

    model = tiny_bert()
    model.save_pretrained(tmp_path)  # type: ignore[operator]
    (tmp_path / "model.safetensors").unlink()  # only the pickled form of the weights remains
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(UserInputError, match=r"never unpickles pytorch_model\.bin"):
        hf.load_directory(tmp_path)
    safe = tmp_path / "safe"
    tiny_bert().save_pretrained(safe)  # type: ignore[operator]
    capsys.readouterr()
    hf.load_directory(safe)
    assert "Loading weights" not in capsys.readouterr().err
    assert transformers.utils.logging.is_progress_bar_enabled()  # restored
