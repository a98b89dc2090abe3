"""Offloaded compression (``--max-memory``): budgets, estimates and clear refusals."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from slimtorch.core.context import Context
from slimtorch.core.errors import ConfigError, UserInputError
from slimtorch.recipe import load_recipe
from slimtorch.testing.artifacts import stored_parts
from slimtorch.workflows.offloaded import (
    checkpoint_fp32_bytes,
    compress_large,
    estimate_peak,
    parse_bytes,
)


def test_parse_bytes() -> None:
    assert parse_bytes("1GB") == 10**9
    assert parse_bytes("512MiB") == 512 * 2**20
    assert parse_bytes("1.5G") == int(1.5e9)
    with pytest.raises(UserInputError, match="1GB"):
        parse_bytes("lots")


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=2048, hidden_size=32, intermediate_size=64, num_hidden_layers=2,  # austen-lm tokens
        num_attention_heads=4, num_key_value_heads=2, use_cache=False,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(tmp_path / "ckpt")
    return tmp_path / "ckpt"


def test_estimate_and_refusals(checkpoint: Path, tmp_path: Path) -> None:
    params = sum(p.numel() for p in LlamaForCausalLM.from_pretrained(checkpoint).parameters())
    assert checkpoint_fp32_bytes(checkpoint) == 4 * params
    with pytest.raises(ConfigError, match="whole model"):
        compress_large(checkpoint, load_recipe("structured-50"), tmp_path / "o", None,
                       10**10, None, Context())  # fmt: skip
    with pytest.raises(ConfigError, match="estimated peak"):
        compress_large(checkpoint, load_recipe("w4a16-gptq"), tmp_path / "o", None,
                       2**20, None, Context())  # fmt: skip
    assert not (tmp_path / "o").exists()


def test_vocabulary_below_the_calibration_tokens_is_refused(tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, use_cache=False,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(tmp_path / "small")
    rtn = load_recipe({"stages": [{"method": "quantize.rtn", "bits": 4}]})
    with pytest.raises(ConfigError, match=r"vocabulary \(64 tokens\).*--tokenizer"):
        compress_large(tmp_path / "small", rtn, tmp_path / "o", None, 10**10, tmp_path / "w",
                       Context(), tokenizer="builtin:austen-lm")  # fmt: skip
    assert not (tmp_path / "o").exists() and not (tmp_path / "w").exists()


def test_estimate_peak_counts_hessians() -> None:
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    with_h = estimate_peak(model, 8, 16, hessians=True)
    without = estimate_peak(model, 8, 16, hessians=False)
    assert with_h["statistics"] == 8 * (6 * 32 * 32 + 64 * 64)  # float64 sums
    assert without["statistics"] < with_h["statistics"]


def test_offloaded_gptq_equals_in_memory(checkpoint: Path, tmp_path: Path) -> None:
    import slimtorch as st
    from slimtorch.calibrate.tasks import make_task
    from slimtorch.formats.artifact import read_artifact
    from slimtorch.models.hf import load_directory

    recipe = {
        "stages": [
            {"method": "quantize.gptq", "bits": 4, "group_size": 16,
             "calibration": {"samples": 4, "batch_size": 2}}
        ]
    }  # fmt: skip
    rec = load_recipe(recipe)
    compress_large(checkpoint, rec, tmp_path / "off", None, 10**10, tmp_path / "w", Context(),
                   tokenizer="builtin:austen-lm")  # fmt: skip
    loaded = load_directory(checkpoint)
    result = st.compress(loaded.model, recipe, data=make_task("causal-lm", None))
    st.save(result.model, tmp_path / "mem")
    off, mem = read_artifact(tmp_path / "off"), read_artifact(tmp_path / "mem")
    assert off.tensors.keys() == mem.tensors.keys()
    for name, t in mem.tensors.items():
        assert torch.equal(off.tensors[name], t), name
    assert off.states.keys() == mem.states.keys() and len(off.states) == 2 * 7
    model = st.load(tmp_path / "off")
    assert model(torch.randint(0, 2048, (1, 8))).logits.shape == (1, 8, 2048)


_HEADS = {"method": "quantize.rtn", "bits": 8, "granularity": "per_channel",
          "targets": ["Embedding", "lm_head", "embed_out"], "missing": "skip"}  # fmt: skip
_GPTQ = {"method": "quantize.gptq", "bits": 4, "group_size": 16,
         "calibration": {"samples": 4, "batch_size": 2}}  # fmt: skip


@pytest.mark.parametrize("stages", [[_GPTQ, _HEADS], [_HEADS, _GPTQ]], ids=["after", "before"])
def test_offloaded_quantizes_a_tied_embedding_once_as_in_memory(
    stages: list[dict[str, Any]], tmp_path: Path
) -> None:
    """The w4a16 presets' second stage (8-bit embeddings / LM head) runs in the offloaded path
    too: same tensors and states as in memory, the tied weight stored once, same bytes. Before
    GPTQ it also changes what GPTQ calibrates on, in both paths."""
    import slimtorch as st
    from slimtorch.calibrate.tasks import make_task
    from slimtorch.formats.artifact import read_artifact, read_manifest
    from slimtorch.models.hf import load_directory

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=2048, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, use_cache=False, tie_word_embeddings=True,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(tmp_path / "ckpt")
    recipe = {"stages": stages}
    compress_large(tmp_path / "ckpt", load_recipe(recipe), tmp_path / "off", None, 10**10,
                   tmp_path / "w", Context(), tokenizer="builtin:austen-lm")  # fmt: skip
    loaded = load_directory(tmp_path / "ckpt")
    result = st.compress(loaded.model, recipe, data=make_task("causal-lm", None))
    st.save(result.model, tmp_path / "mem")
    off, mem = read_artifact(tmp_path / "off"), read_artifact(tmp_path / "mem")
    assert off.tensors.keys() == mem.tensors.keys() and off.states.keys() == mem.states.keys()
    for name, t in mem.tensors.items():
        assert torch.equal(off.tensors[name], t), name
    assert {"model.embed_tokens.weight", "lm_head.weight"} <= off.states.keys()
    assert off.states["lm_head.weight"].quant.bits == 8  # type: ignore[union-attr]
    manifests = read_manifest(tmp_path / "off"), read_manifest(tmp_path / "mem")
    assert (
        manifests[0]["aliases"]
        == manifests[1]["aliases"]
        == {"lm_head.weight": "model.embed_tokens.weight"}
    )
    # the same stored parts, byte for byte; only their order in the file (the header) differs
    parts = [stored_parts(tmp_path / d) for d in ("off", "mem")]
    assert parts[0] == parts[1]
    model = st.load(tmp_path / "off")
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_missing_targets_are_checked_on_the_whole_model(checkpoint: Path, tmp_path: Path) -> None:
    """``missing: error`` (the default) fails up front when no layer anywhere matches, and a
    target only outside the blocks (the LM head) is no error: it is quantized there."""
    from slimtorch.core.errors import TargetError
    from slimtorch.formats.artifact import read_artifact

    nothing = load_recipe({"stages": [{"method": "quantize.rtn", "targets": ["nope"]}]})
    with pytest.raises(TargetError):
        compress_large(checkpoint, nothing, tmp_path / "o", None, 10**10, tmp_path / "w",
                       Context(), tokenizer="builtin:austen-lm")  # fmt: skip
    assert not (tmp_path / "o").exists() and not (tmp_path / "w").exists()
    head = load_recipe({"stages": [{"method": "quantize.rtn", "targets": ["lm_head"]}]})
    compress_large(checkpoint, head, tmp_path / "o", None, 10**10, tmp_path / "w", Context(),
                   tokenizer="builtin:austen-lm")  # fmt: skip
    assert set(read_artifact(tmp_path / "o").states) == {"lm_head.weight"}


def test_checkpoint_dir_finds_the_weights_of_a_model_spec(checkpoint: Path, tmp_path: Path) -> None:
    """--max-memory reads a Hugging Face directory: the one given, a .gguf file's cached
    conversion or a builtin's (builtin:smollm2-135m); nothing for a builtin without one."""
    from slimtorch.models.registry import checkpoint_dir

    assert checkpoint_dir(str(checkpoint)) == checkpoint
    assert checkpoint_dir("builtin:lenet5-fashion") is None
    assert checkpoint_dir(str(tmp_path)) is None  # no config.json
