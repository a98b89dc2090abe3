"""Offloaded (``--max-memory``) float-format stages: quantize.mxfp4 / nvfp4 / fp8 block by block.

The offloaded artifact must be the in-memory one: the same tensors and states, every stored part
(FP4/FP8 codes, block and channel scales, NVFP4's tensor scale) bit-identical, also with
``quantize.fp8 activations: dynamic`` (runtime Fp8Linear swaps, recorded in the manifest).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import slimtorch as st
from slimtorch.calibrate.tasks import make_task
from slimtorch.core.context import Context
from slimtorch.core.errors import TargetError
from slimtorch.formats.artifact import read_artifact, read_manifest
from slimtorch.models.hf import load_directory
from slimtorch.recipe import load_recipe
from slimtorch.testing.artifacts import stored_parts
from slimtorch.workflows.offloaded import compress_large

QUIET = Context(progress=False)


def _checkpoint(path: Path, tied: bool) -> Path:
    """A tiny Llama saved as a Hugging Face checkpoint. Its MLP down projections have 80 inputs:
    5 whole NVFP4 blocks of 16, and MXFP4 blocks of 32 with a last one cut short (2 * 32 + 16)."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=2048, hidden_size=64, intermediate_size=80, num_hidden_layers=2,  # austen-lm
        num_attention_heads=4, num_key_value_heads=2, use_cache=False, tie_word_embeddings=tied,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # a few outliers: distinct block scales, some rows far from others
        model.model.layers[1].mlp.down_proj.weight[3, 7] = 0.9
        model.model.layers[0].self_attn.q_proj.weight[:, 5] *= 20
    model.save_pretrained(path)
    return path


def _both(ckpt: Path, recipe: Any, tmp_path: Path) -> tuple[Path, Path]:
    """The recipe offloaded (block by block, forced: compress_large always streams) and in
    memory, saved as artifacts."""
    compress_large(ckpt, load_recipe(recipe), tmp_path / "off", None, 10**10, tmp_path / "w",
                   QUIET, tokenizer="builtin:austen-lm")  # fmt: skip
    loaded = load_directory(ckpt)
    result = st.compress(loaded.model, recipe, data=make_task("causal-lm", None), ctx=QUIET)
    st.save(result.model, tmp_path / "mem")
    return tmp_path / "off", tmp_path / "mem"


def _assert_same(off: Path, mem: Path) -> dict[str, Any]:
    a, b = read_artifact(off), read_artifact(mem)
    assert a.tensors.keys() == b.tensors.keys() and a.states.keys() == b.states.keys()
    for name, t in b.tensors.items():
        assert torch.equal(a.tensors[name], t), name
    for name, s in b.states.items():
        qa, qb = a.states[name].quant, s.quant
        assert qa is not None and qb is not None, name
        assert (qa.scheme, qa.bits, qa.element, qa.scale_format, qa.group_size) == (
            qb.scheme, qb.bits, qb.element, qb.scale_format, qb.group_size
        ), name  # fmt: skip
        assert torch.equal(qa.codes, qb.codes) and torch.equal(qa.scale, qb.scale), name
        if qb.global_scale is not None:
            assert qa.global_scale is not None and torch.equal(qa.global_scale, qb.global_scale)
    assert stored_parts(off) == stored_parts(mem)  # byte for byte (the header order aside)
    return b.states


@pytest.mark.parametrize("preset", ["mxfp4", "nvfp4", "fp8"])
def test_offloaded_float_preset_equals_in_memory(preset: str, tmp_path: Path) -> None:
    """The presets: the float stage on every Linear of the blocks (the LM head ignored, so the
    stage skips the layers outside the blocks), then int8 RTN of the embeddings and LM head."""
    ckpt = _checkpoint(tmp_path / "ckpt", tied=False)
    off, mem = _both(ckpt, preset, tmp_path)
    states = _assert_same(off, mem)
    element = {"mxfp4": "e2m1", "nvfp4": "e2m1", "fp8": "e4m3"}[preset]
    down = states["model.layers.1.mlp.down_proj.weight"].quant
    assert down.scheme == "float" and down.element == element
    assert states["lm_head.weight"].quant.scheme == "affine"  # the preset's int8 RTN stage
    assert len(states) == 2 * 7 + 2
    model = st.load(off)
    assert model(torch.randint(0, 2048, (1, 8))).logits.shape == (1, 8, 2048)


@pytest.mark.parametrize("method", ["quantize.mxfp4", "quantize.nvfp4", "quantize.fp8"])
def test_offloaded_float_stage_outside_the_blocks_and_tied_once(
    method: str, tmp_path: Path
) -> None:
    """The float stage itself on the layers outside the blocks: a tied embedding and LM head in
    the float format, quantized once and stored once, as in memory."""
    ckpt = _checkpoint(tmp_path / "ckpt", tied=True)
    recipe = {"stages": [{"method": method, "targets": ["Linear", "Embedding"]}]}
    off, mem = _both(ckpt, recipe, tmp_path)
    states = _assert_same(off, mem)
    assert len(states) == 2 * 7 + 2
    assert states["lm_head.weight"].quant.scheme == "float"
    assert states["lm_head.weight"].quant is states["model.embed_tokens.weight"].quant
    aliases = read_manifest(off)["aliases"], read_manifest(mem)["aliases"]
    assert aliases[0] == aliases[1] == {"lm_head.weight": "model.embed_tokens.weight"}
    model = st.load(off)
    assert model.lm_head.weight is model.model.embed_tokens.weight


@pytest.mark.parametrize("float_first", [True, False])
def test_offloaded_nvfp4_beside_gptq_equals_in_memory(float_first: bool, tmp_path: Path) -> None:
    """A float stage beside a calibrated one, in either order: NVFP4 on the MLP, GPTQ on the
    attention. NVFP4 first: GPTQ calibrates on the outputs of the NVFP4 blocks in both paths.
    GPTQ first: in memory GPTQ of block 1 sees block 0 with its MLP still dense, so the
    offloaded run quantizes a block's MLP only after the next block's inputs are computed
    (before that fix layer 1's attention codes differed)."""
    ckpt = _checkpoint(tmp_path / "ckpt", tied=False)
    nvfp4 = {"method": "quantize.nvfp4", "targets": ["re:.*mlp.*"]}
    gptq = {"method": "quantize.gptq", "bits": 4, "group_size": 16, "targets": ["re:.*self_attn.*"],
            "calibration": {"samples": 4, "batch_size": 2}}  # fmt: skip
    recipe = {"stages": [nvfp4, gptq] if float_first else [gptq, nvfp4]}
    off, mem = _both(ckpt, recipe, tmp_path)
    states = _assert_same(off, mem)
    assert states["model.layers.0.self_attn.q_proj.weight"].quant.scheme == "affine"
    assert states["model.layers.0.mlp.up_proj.weight"].quant.scheme == "float"
    assert len(states) == 2 * 7


@pytest.mark.parametrize("tied", [False, True])
def test_offloaded_fp8_dynamic_equals_in_memory(tied: bool, tmp_path: Path) -> None:
    """``activations: dynamic`` swaps each block's Linear layers for Fp8Linear as it streams by:
    the preset (LM head ignored, then int8 embeddings / head) and every Linear, the LM head
    included (a tied head is swapped at the end, as in memory); the same buffers, states and
    manifest records, and the same logits once loaded."""
    ckpt = _checkpoint(tmp_path / "ckpt", tied=tied)
    recipe: Any = "fp8-dynamic" if not tied else {
        "stages": [{"method": "quantize.fp8", "activations": "dynamic"}]}  # fmt: skip
    off, mem = _both(ckpt, recipe, tmp_path)
    _assert_same(off, mem)
    records = read_manifest(off)["modules"]
    assert records == read_manifest(mem)["modules"]
    fp8 = [r["name"] for r in records if r["type"] == "Fp8Linear"]
    assert len(fp8) == 2 * 7 + tied and ("lm_head" in fp8) is tied
    ids = torch.randint(0, 2048, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = [st.load(p)(ids).logits for p in (off, mem)]  # type: ignore[operator]
    assert torch.equal(*logits)


def test_offloaded_float_targets_matching_nothing_fail_up_front(tmp_path: Path) -> None:
    ckpt = _checkpoint(tmp_path / "ckpt", tied=False)
    nothing = load_recipe({"stages": [{"method": "quantize.mxfp4", "targets": ["nope"]}]})
    with pytest.raises(TargetError):
        compress_large(ckpt, nothing, tmp_path / "o", None, 10**10, tmp_path / "w", QUIET,
                       tokenizer="builtin:austen-lm")  # fmt: skip
    assert not (tmp_path / "o").exists() and not (tmp_path / "w").exists()
