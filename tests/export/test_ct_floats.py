"""FP8 / NVFP4 / MXFP4 in the compressed-tensors layouts; transformers reloads them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import slimtorch as st
from slimtorch.core.context import Context
from slimtorch.core.errors import UnsupportedModelError
from slimtorch.export.compressed_tensors import export_compressed_tensors
from slimtorch.export.ct_floats import pack_fp4, unpack_fp4
from slimtorch.formats import floats
from slimtorch.formats.state import get_state
from slimtorch.runtime import Fp8Linear

transformers = pytest.importorskip("transformers")
QUIET = Context(progress=False)


def _llama() -> nn.Module:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.05)
    return model


def _quantized(method: str, **options: object) -> nn.Module:
    stage = {"method": method, "ignore": ["lm_head"], **options}
    return st.compress(_llama(), {"stages": [stage]}, ctx=QUIET).model


def _reload(path: Path) -> nn.Module:
    pytest.importorskip("compressed_tensors", reason="transformers needs it to read the layout")
    return transformers.AutoModelForCausalLM.from_pretrained(path, local_files_only=True)


def _logits(model: nn.Module) -> torch.Tensor:
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(ids).logits


def test_fp4_packing_matches_compressed_tensors() -> None:
    codes = torch.randint(0, 16, (5, 32), generator=torch.Generator().manual_seed(0))
    packed = pack_fp4(codes)
    assert packed.shape == (5, 16) and packed.dtype == torch.uint8
    assert torch.equal(unpack_fp4(packed), codes.to(torch.uint8))
    helpers = pytest.importorskip("compressed_tensors.compressors.nvfp4.helpers")
    theirs = helpers.unpack_fp4_from_uint8(packed, 5, 32, dtype=torch.float32)
    assert torch.equal(theirs, floats.decode_e2m1(codes))


@pytest.mark.parametrize(
    ("method", "fmt", "scale_dtype"),
    [
        ("quantize.fp8", "float-quantized", torch.float32),
        ("quantize.nvfp4", "nvfp4-pack-quantized", torch.float8_e4m3fn),
        ("quantize.mxfp4", "mxfp4-pack-quantized", torch.uint8),
    ],
)
def test_layout_on_disk(method: str, fmt: str, scale_dtype: torch.dtype, tmp_path: Path) -> None:
    model = _quantized(method)
    export_compressed_tensors(model, tmp_path / "ct")
    qc = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert qc["format"] == fmt and qc["config_groups"]["group_0"]["format"] == fmt
    assert qc["config_groups"]["group_0"]["weights"]["type"] == "float"
    tensors = load_file(str(tmp_path / "ct" / "model.safetensors"))
    name = "model.layers.0.mlp.down_proj"
    assert tensors[f"{name}.weight_scale"].dtype == scale_dtype
    q = get_state(model.get_submodule(name), "weight").quant  # type: ignore[union-attr]
    assert q is not None
    if fmt == "float-quantized":
        stored = tensors[f"{name}.weight"]
        assert stored.dtype == torch.float8_e4m3fn and torch.equal(
            stored.view(torch.uint8), q.codes
        )
        return
    assert torch.equal(unpack_fp4(tensors[f"{name}.weight_packed"]), q.codes.to(torch.uint8))
    assert tensors[f"{name}.weight_scale"].shape == (64, 128 // q.group_size)  # type: ignore[operator]
    assert qc["dequantize"] is True
    assert (f"{name}.weight_global_scale" in tensors) == (fmt == "nvfp4-pack-quantized")


def test_fp8_and_mxfp4_reload_bit_identical(tmp_path: Path) -> None:
    for method in ("quantize.fp8", "quantize.mxfp4"):
        model = _quantized(method)
        export_compressed_tensors(model, tmp_path / method)
        reloaded = _reload(tmp_path / method)
        assert torch.equal(_logits(reloaded), _logits(model)), method
        o_proj = "model.layers.1.self_attn.o_proj"
        ref, got = model.get_submodule(o_proj).weight, reloaded.get_submodule(o_proj).weight
        assert isinstance(ref, torch.Tensor) and isinstance(got, torch.Tensor)
        assert torch.equal(got, ref)


def test_nvfp4_reloads_as_bfloat16_of_the_weights(tmp_path: Path) -> None:
    """compressed-tensors 0.20 dequantizes FP4 in bfloat16: NVFP4's ``e2m1 * scale / global``
    is rounded there (MXFP4's powers of two are not)."""
    model = _quantized("quantize.nvfp4")
    export_compressed_tensors(model, tmp_path / "ct")
    reloaded = _reload(tmp_path / "ct")
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name != "lm_head":
            got = reloaded.get_submodule(name).weight
            assert isinstance(got, torch.Tensor)
            assert torch.equal(got, module.weight.to(torch.bfloat16).to(torch.float32)), name
    assert (_logits(reloaded) - _logits(model)).abs().max().item() < 0.02


def test_fp8_dynamic_w8a8_reloads_with_the_same_logits(tmp_path: Path) -> None:
    model = _quantized("quantize.fp8", activations="dynamic")
    assert isinstance(model.get_submodule("model.layers.0.mlp.up_proj"), Fp8Linear)
    export_compressed_tensors(model, tmp_path / "ct")
    qc = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    inputs = qc["config_groups"]["group_0"]["input_activations"]
    assert inputs["strategy"] == "token" and inputs["dynamic"] is True
    assert torch.equal(_logits(_reload(tmp_path / "ct")), _logits(model))


def test_ragged_blocks_are_refused(tmp_path: Path) -> None:
    recipe = {"stages": [{"method": "quantize.mxfp4"}]}
    model = st.compress(nn.Sequential(nn.Linear(40, 8)), recipe, ctx=QUIET).model
    from slimtorch.export.ct_layout import grid_of

    state = get_state(model[0], "weight")
    assert state is not None
    with pytest.raises(UnsupportedModelError, match="multiple of its block size 32"):
        grid_of("0", model[0], state)
    assert not (tmp_path / "ct").exists()


def test_export_checked_compares_nvfp4_as_the_reader_computes(tmp_path: Path) -> None:
    pytest.importorskip("compressed_tensors", reason="the check loads the export in transformers")
    from slimtorch.export.compressed_tensors import export_checked

    model = _quantized("quantize.nvfp4")
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(2))
    report = export_checked(model, [ids], tmp_path / "ct")
    assert report["verified"] == "transformers" and report["max_abs_diff"] == 0.0
    assert "bfloat16" in report["verified_note"]
    plain = export_checked(_quantized("quantize.mxfp4"), [ids], tmp_path / "mx")
    assert plain["max_abs_diff"] == 0.0 and "verified_note" not in plain
