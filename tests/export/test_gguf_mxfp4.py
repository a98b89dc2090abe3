"""MXFP4 weights as GGUF ``MXFP4`` blocks (gguf 0.19): bit-exact against gguf's own decoder
and its reference quantizer; the whole model reads back exactly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
if not hasattr(gguf.GGMLQuantizationType, "MXFP4"):
    pytest.skip("this gguf has no MXFP4 type (gguf >= 0.18 has)", allow_module_level=True)

# the tiny Llama with a tokenizer of the GGUF export tests (same folder, pytest's sys.path)
from test_export_gguf import EMBED8, compressed, llama_dir, permute_rows, read_back  # noqa: E402,F401

from slimtorch.export import export  # noqa: E402
from slimtorch.export.gguf_blocks import BYTES, NotRepresentable, grid_blocks  # noqa: E402
from slimtorch.formats.state import dequantize  # noqa: E402
from slimtorch.quantize import floats as qf  # noqa: E402

MXFP4 = gguf.GGMLQuantizationType.MXFP4


def _weight(rows: int = 6, cols: int = 96) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(0))


def test_blocks_decode_with_ggufs_dequantizer() -> None:
    w = _weight()
    w[1, :32] = 0.0
    q = qf.mxfp4(w)
    blocks = grid_blocks(q, None, tuple(w.shape))
    assert blocks.ggml_type == "MXFP4"
    assert blocks.data.shape == (6, 3 * BYTES["MXFP4"]) and blocks.data.dtype == np.uint8
    theirs = gguf.quants.dequantize(blocks.data, MXFP4)
    assert np.array_equal(theirs, dequantize(q, w.shape).numpy())
    assert np.array_equal(blocks.values, theirs)


def test_same_values_as_ggufs_reference_quantizer() -> None:
    """gguf's MXFP4 quantizer (numpy, llama.cpp's algorithm) gives the same values wherever
    no element sits exactly on a rounding midpoint (it breaks ties to the lower magnitude)."""
    w = _weight(16, 256)
    ours = dequantize(qf.mxfp4(w), w.shape).numpy()
    theirs = gguf.quants.dequantize(gguf.quants.quantize(w.numpy(), MXFP4), MXFP4)
    assert np.array_equal(ours, theirs)


def test_other_float_states_are_not_representable() -> None:
    w = _weight(4, 64)
    for q in (qf.nvfp4(w), qf.fp8_per_channel(w)):
        with pytest.raises(NotRepresentable, match="MXFP4"):
            grid_blocks(q, None, tuple(w.shape))


def test_model_reads_back_exactly(llama_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    from slimtorch.export import gguf as gguf_export

    if "MXFP4" not in gguf_export._FILE_TYPES:
        pytest.skip("export/gguf.py does not name MXFP4's file type yet (MOSTLY_MXFP4_MOE)")
    model = compressed(llama_dir, [{"method": "quantize.mxfp4"}, EMBED8])
    report = export(model, "gguf", tmp_path / "m.gguf")
    tensors = read_back(tmp_path / "m.gguf")
    params = dict(model.named_parameters())
    from slimtorch.models.gguf import hf_name

    kinds = set()
    for name, (kind, values) in tensors.items():
        want = params[hf_name(name)].detach().numpy()
        stem = name.split(".")[-2]
        if stem in ("attn_q", "attn_k"):
            want = permute_rows(want, {"attn_q": 4, "attn_k": 2}[stem])
        if name.startswith("blk.") and values.ndim == 2:
            kinds.add(kind)
        assert np.array_equal(values, want), name
    assert kinds == {"MXFP4"}
    assert report["scale_rounding_max_abs"] == 0.0
