"""FP8 per channel, MXFP4 and NVFP4 quantizers against the formats' definitions; storage."""

from __future__ import annotations

import math

import pytest
import torch

from slimtorch.formats import floats
from slimtorch.formats.encoding import decode_tensor, encode_tensor
from slimtorch.formats.state import WeightState, dequantize
from slimtorch.quantize import floats as qf

E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


def _round_e2m1(v: float) -> float:
    """Nearest E2M1 value of ``v`` by definition: clamp to 6, ties to the even code."""
    a = min(abs(v), 6.0)
    best = min(range(8), key=lambda i: (abs(E2M1[i] - a), i % 2))
    return math.copysign(E2M1[best], v)


def _weight(rows: int = 8, cols: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))


def test_mxfp4_matches_the_ocp_definition_elementwise() -> None:
    w = _weight(4, 64)
    w[1, :32] = 0.0  # an all-zero block
    w[2, :32] = w[2, :32] / w[2, :32].abs().max() * 4.0  # amax exactly a power of two
    w[3, 32:] = w[3, 32:] / w[3, 32:].abs().max() * 7.9  # amax / X = 7.9 > 6: clamps
    q = qf.mxfp4(w)
    assert q.scale.shape == (4, 2) and q.scale_format == "e8m0" and q.group_size == 32
    got = dequantize(q, w.shape)
    for r in range(4):
        for b in range(2):
            block = w[r, 32 * b : 32 * b + 32].tolist()
            amax = max(abs(v) for v in block)
            x = 2.0 ** (math.floor(math.log2(amax)) - 2) if amax > 0 else 1.0
            assert float(q.scale[r, b]) == x
            want = [_round_e2m1(v / x) * x for v in block]
            assert got[r, 32 * b : 32 * b + 32].tolist() == want
    assert float(q.scale[2, 0]) == 1.0  # 2 ** (log2(4) - 2)
    assert float(got[2, :32].abs().max()) == 4.0  # the power-of-two amax is exact
    assert float(got[3, 32:].abs().max()) == 6.0 * float(q.scale[3, 1])
    assert not bool(got[1, :32].any())


def test_nvfp4_matches_the_definition_elementwise() -> None:
    w = _weight(4, 48)
    w[0, :16] = 0.0
    q = qf.nvfp4(w)
    assert q.scale.shape == (4, 3) and q.scale_format == "e4m3" and q.global_scale is not None
    glob = float(q.global_scale)
    assert glob == pytest.approx(6 * 448 / float(w.abs().max()), rel=1e-7)
    # every block scale is an E4M3 value; the largest block reaches 448
    assert torch.equal(floats.decode_e4m3(floats.encode_e4m3(q.scale)), q.scale)
    assert float(q.scale.max()) == 448.0 and float(q.scale[0, 0]) == 0.0
    got = dequantize(q, w.shape)
    for r in range(4):
        for b in range(3):
            eff = float(torch.tensor(float(q.scale[r, b])) / q.global_scale)  # float32 divide
            block = w[r, 16 * b : 16 * b + 16].tolist()
            want = [_round_e2m1(v / eff) * eff if eff else 0.0 for v in block]
            assert got[r, 16 * b : 16 * b + 16].tolist() == pytest.approx(want, rel=1e-6, abs=0)
    assert not bool(got[0, :16].any())


def test_fp8_per_channel_matches_torch_float8() -> None:
    w = _weight(6, 40)
    w[5] = 0.0
    q = qf.fp8_per_channel(w)
    scale = w.abs().amax(dim=1, keepdim=True) / 448
    scale[5] = 1.0
    ref = (w / scale).to(torch.float8_e4m3fn).to(torch.float32) * scale
    assert torch.equal(dequantize(q, w.shape), ref)
    assert torch.equal(q.scale, scale) and q.bits == 8 and q.element == "e4m3"


def test_all_zero_tensor_and_ragged_blocks_and_masks() -> None:
    zero = torch.zeros(3, 32)
    for fn in (qf.fp8_per_channel, qf.mxfp4, qf.nvfp4):
        assert not bool(dequantize(fn(zero), zero.shape).any())
    assert float(qf.nvfp4(zero).global_scale) == 1.0  # type: ignore[arg-type]
    w = _weight(2, 40)  # 40 = 32 + 8 and 16 + 16 + 8: a short last block
    q = qf.mxfp4(w)
    assert q.scale.shape == (2, 2)
    tail = w[:, 32:]
    x = 2.0 ** (math.floor(math.log2(float(tail[0].abs().max()))) - 2)
    assert float(q.scale[0, 1]) == x
    mask = w.abs() > 0.5
    for fn in (qf.fp8_per_channel, qf.mxfp4, qf.nvfp4):
        got = dequantize(fn(w, mask), w.shape)
        assert not bool(got[~mask].any())
    with pytest.raises(ValueError, match="NaN or Inf"):
        qf.mxfp4(torch.tensor([[float("nan")] * 32]))


@pytest.mark.parametrize(
    ("fn", "bits_per_weight"), [(qf.mxfp4, 4.25), (qf.nvfp4, 4.5), (qf.fp8_per_channel, 8.0)]
)
def test_stored_compactly_and_exactly(fn, bits_per_weight: float) -> None:
    w = _weight(256, 512)
    q = fn(w)
    values = dequantize(q, w.shape)
    parts, meta = encode_tensor(values, WeightState(quant=q), "w")
    stored = meta["bytes"] * 8 / w.numel()
    assert stored == pytest.approx(bits_per_weight, abs=0.07)
    if q.scale_format is not None:
        assert parts["scale"].dtype == torch.uint8  # one byte per block scale
    back, state = decode_tensor(meta, parts)
    assert torch.equal(back, values)
    assert state is not None and state.quant is not None
    assert state.quant.scheme == "float" and state.quant.element == q.element
    assert torch.equal(state.quant.codes.to(torch.uint8), q.codes)
