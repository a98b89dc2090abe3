"""Passthrough with slices (frankenmerges): layers stacked and renumbered, config updated, the
result reloads in transformers; bad slices name the problem."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file

from slimtorch.core.errors import ConfigError
from slimtorch.merge import load_config, merge_to_dir, parse_config
from slimtorch.merge.slices import Slice, out_config

transformers = pytest.importorskip("transformers")


def tiny_llama_dirs(tmp: Path, names: str = "ab") -> None:
    """Two 4-layer Llama models (different seeds) saved as Hugging Face directories."""
    cfg = transformers.LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=4,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
        tie_word_embeddings=False,
    )  # fmt: skip
    for i, n in enumerate(names):
        torch.manual_seed(i)
        transformers.LlamaForCausalLM(cfg).save_pretrained(tmp / n)


def frankenmerge(tmp: Path, **extra: Any) -> dict[str, Any]:
    return {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": str(tmp / "a"), "layer_range": [0, 3]}]},
            {"sources": [{"model": str(tmp / "b"), "layer_range": [1, 4]}]},
        ],
        **extra,
    }


def test_frankenmerge_stacks_layers_and_reloads(tmp_path: Path) -> None:
    tiny_llama_dirs(tmp_path)
    path = tmp_path / "f.yaml"
    path.write_text(yaml.safe_dump(frankenmerge(tmp_path, dtype="bfloat16")), encoding="utf-8")
    report = merge_to_dir(load_config(path), tmp_path / "out", force=True)
    assert report["layers"] == 6
    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    a = load_file(str(tmp_path / "a" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "model.safetensors"))
    key = "model.layers.{}.mlp.down_proj.weight"
    for i, (src, layer) in enumerate([(a, 0), (a, 1), (a, 2), (b, 1), (b, 2), (b, 3)]):
        assert torch.equal(out[key.format(i)], src[key.format(layer)].bfloat16()), i
    assert torch.equal(out["model.embed_tokens.weight"], a["model.embed_tokens.weight"].bfloat16())
    assert torch.equal(out["lm_head.weight"], b["lm_head.weight"].bfloat16())  # last slice's
    assert "model.layers.6.mlp.down_proj.weight" not in out
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 6 and cfg["dtype"] == "bfloat16"
    model = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out")
    assert model.config.num_hidden_layers == 6 and len(model.model.layers) == 6
    assert model(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 64)


def test_layer_types_follow_the_slices() -> None:
    cfg = {"num_hidden_layers": 4, "layer_types": ["s", "f", "s", "f"]}
    got = out_config(cfg, [Slice("a", 0, 2), Slice("a", 1, 4)])
    assert got["num_hidden_layers"] == 5 and got["layer_types"] == ["s", "f", "f", "s", "f"]


@pytest.mark.parametrize(
    ("slices", "match"),
    [
        ([], "non-empty list"),
        ([{"sources": [{"model": "a", "layer_range": [0, 2]}] * 2}], "exactly one source"),
        ([{"sources": [{"model": "a"}]}], "layer_range"),
        ([{"sources": [{"model": "a", "layer_range": [3, 1]}]}], "start < end"),
        ([{"sources": [{"model": "a", "layer_range": [0, 1], "parameters": {"t": 1}}]}], "scale"),
    ],
)
def test_bad_slices(slices: Any, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        parse_config({"merge_method": "passthrough", "slices": slices})


def test_slices_only_with_passthrough_and_layers_must_exist(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unsupported"):
        parse_config({**frankenmerge(tmp_path), "merge_method": "linear"})
    with pytest.raises(ConfigError, match="takes no"):
        parse_config({**frankenmerge(tmp_path), "models": [{"model": "a"}]})
    tiny_llama_dirs(tmp_path, "a")
    cfg = frankenmerge(tmp_path)
    cfg["slices"] = [{"sources": [{"model": str(tmp_path / "a"), "layer_range": [2, 6]}]}]
    with pytest.raises(ConfigError, match=r"no layers \[4, 5\]"):
        merge_to_dir(parse_config(cfg), tmp_path / "out")
    assert not (tmp_path / "out").exists()
