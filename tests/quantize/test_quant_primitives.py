"""Affine quantization maths: SQNR bounds, code ranges, zero, masks, fp16 scales, bad inputs."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from slimtorch.core.errors import ConfigError
from slimtorch.formats.state import WeightState, dequantize, effective_weight
from slimtorch.quantize.affine import fake_quantize, quantize_weight
from slimtorch.quantize.primitives import QuantSpec


def sqnr_db(w: torch.Tensor, q: torch.Tensor) -> float:
    return float(10 * torch.log10(w.pow(2).sum() / (w - q).pow(2).sum()))


@pytest.fixture
def gaussian() -> torch.Tensor:
    return torch.randn(96, 256, generator=torch.Generator().manual_seed(0))


def test_int8_per_channel_sqnr(gaussian: torch.Tensor) -> None:
    q = quantize_weight(gaussian, QuantSpec(bits=8))
    assert sqnr_db(gaussian, dequantize(q, gaussian.shape)) > 35.0
    assert q.scale.shape == (96, 1) and q.zero_point.shape == (96, 1)
    assert q.scale.dtype == torch.float32 and q.zero_point.dtype == torch.int32


def test_int4_group32_sqnr(gaussian: torch.Tensor) -> None:
    q = quantize_weight(gaussian, QuantSpec(bits=4, granularity="per_group", group_size=32))
    assert q.scale.shape == (96, 8) and q.group_size == 32
    assert sqnr_db(gaussian, dequantize(q, gaussian.shape)) > 18.0


def test_per_tensor_is_worse_than_per_channel(gaussian: torch.Tensor) -> None:
    w = gaussian * torch.linspace(0.1, 3.0, 96)[:, None]  # channels of very different scale
    per_t = dequantize(quantize_weight(w, QuantSpec(bits=4, granularity="per_tensor")), w.shape)
    per_c = dequantize(quantize_weight(w, QuantSpec(bits=4)), w.shape)
    assert sqnr_db(w, per_c) > sqnr_db(w, per_t) + 3.0


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize(
    ("signed", "symmetric", "lo", "hi"),
    [
        (True, True, lambda b: -(2 ** (b - 1) - 1), lambda b: 2 ** (b - 1) - 1),
        (False, True, lambda b: 1, lambda b: 2**b - 1),
        (True, False, lambda b: -(2 ** (b - 1)), lambda b: 2 ** (b - 1) - 1),
        (False, False, lambda b: 0, lambda b: 2**b - 1),
    ],
)
def test_code_ranges(
    bits: int, signed: bool, symmetric: bool, lo: Callable[[int], int], hi: Callable[[int], int]
) -> None:
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(bits))
    q = quantize_weight(w, QuantSpec(bits=bits, signed=signed, symmetric=symmetric))
    assert q.codes.dtype == (torch.int8 if signed else torch.uint8)
    assert int(q.codes.min()) == lo(bits)  # extremes of each channel land on the grid ends
    assert int(q.codes.max()) == hi(bits)
    if symmetric:
        expected = 0 if signed else 2 ** (bits - 1)
        assert bool((q.zero_point == expected).all())


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("signed", [True, False])
def test_zero_is_exact(signed: bool, symmetric: bool) -> None:
    w = torch.rand(8, 40, generator=torch.Generator().manual_seed(1)) + 0.5  # all positive
    w[:, ::3] = 0.0
    w[3] = 0.0  # an all-zero channel: no NaN, all zeros back
    q = quantize_weight(w, QuantSpec(bits=4, signed=signed, symmetric=symmetric))
    d = dequantize(q, w.shape)
    assert torch.isfinite(q.scale).all() and bool((q.scale > 0).all())
    assert bool((d[w == 0] == 0).all())
    assert bool((d[3] == 0).all())


def test_masked_weights_stats_and_zero() -> None:
    w = torch.randn(4, 32, generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(w, dtype=torch.bool)
    mask[:, :4] = False
    w[:, 0] = 100.0  # a huge pruned weight must not widen the range
    for symmetric in (True, False):
        q = quantize_weight(w, QuantSpec(bits=8, symmetric=symmetric, signed=True), mask)
        d = dequantize(q, w.shape)
        assert bool((d[~mask] == 0).all())
        assert bool((q.codes[~mask] == q.zero_point.expand_as(w)[~mask]).all())
        kept_range = w[:, 4:].amax(1) - w[:, 4:].amin(1).clamp(max=0)
        assert bool((q.scale.flatten() < kept_range / 100).all())


def test_partial_last_group_and_short_rows() -> None:
    w = torch.randn(5, 70, generator=torch.Generator().manual_seed(3))
    q = quantize_weight(w, QuantSpec(bits=4, granularity="per_group", group_size=32))
    assert q.scale.shape == (5, 3)
    # the partial group [64:70] has its own scale = its max |w| / 7 (up to fp16 rounding)
    expected = w[:, 64:].abs().amax(1) / 7
    assert torch.allclose(q.scale[:, 2], expected, rtol=1e-3)
    short = quantize_weight(w[:, :16], QuantSpec(bits=4, granularity="per_group", group_size=128))
    assert short.scale.shape == (5, 1) and short.group_size == 16


def test_fp16_scales_are_exact_and_effective_weight_is_bit_exact() -> None:
    w = torch.randn(32, 48, generator=torch.Generator().manual_seed(4))
    q = quantize_weight(w, QuantSpec(bits=4, symmetric=False, signed=False))
    assert q.scale_dtype == "float16"
    assert torch.equal(q.scale.half().float(), q.scale)
    param = effective_weight(WeightState(quant=q), w)
    q.scale = q.scale.half().float()  # what an artifact stores and loads back
    assert torch.equal(effective_weight(WeightState(quant=q), w), param)


def test_fp16_refused_outside_normal_range() -> None:
    w = torch.randn(8, 16, generator=torch.Generator().manual_seed(5))
    assert quantize_weight(w * 1e-7, QuantSpec(bits=8)).scale_dtype == "float32"
    assert quantize_weight(w * 1e8, QuantSpec(bits=8)).scale_dtype == "float32"


def test_conv_weight_uses_matrix_view_and_keeps_shape() -> None:
    w = torch.randn(6, 3, 3, 3, generator=torch.Generator().manual_seed(6))
    q = quantize_weight(w, QuantSpec(bits=8, granularity="per_group", group_size=9))
    assert q.codes.shape == w.shape and q.scale.shape == (6, 3)
    assert sqnr_db(w, dequantize(q, w.shape)) > 35.0


def test_fake_quantize_dtype_and_values() -> None:
    w = torch.randn(8, 32, generator=torch.Generator().manual_seed(7)).to(torch.bfloat16)
    fq = fake_quantize(w, QuantSpec(bits=8))
    assert fq.dtype == torch.bfloat16 and fq.shape == w.shape
    assert fake_quantize(fq.float(), QuantSpec(bits=8)).unique().numel() <= 8 * 255


@pytest.mark.parametrize(
    "kwargs",
    [
        {"bits": 1},
        {"bits": 9},
        {"granularity": "per_group", "group_size": 0},
        {"granularity": "per_group"},
        {"granularity": "per_row"},
        {"observer": "kl"},
    ],
)
def test_bad_specs(kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        QuantSpec(**kwargs)  # type: ignore[arg-type]


def test_full_range_symmetric_grid_is_llama_cpps_q4_0(gaussian: torch.Tensor) -> None:
    """All 16 codes: each group's largest-magnitude weight lands exactly on code -8 (the
    scale's sign is chosen for it), and the error is lower than the 15-level grid's."""
    full = QuantSpec(bits=4, granularity="per_group", group_size=32, full_range=True)
    q = quantize_weight(gaussian, full)
    codes = q.codes.reshape(96, -1, 32).float()
    assert int(codes.min()) == -8 and int(codes.max()) == 7
    assert bool((q.scale < 0).any()) and bool((q.scale > 0).any())
    blocks = gaussian.reshape(96, -1, 32)
    extreme = blocks.gather(-1, blocks.abs().argmax(-1, keepdim=True)).squeeze(-1)
    assert torch.allclose(extreme, -8 * q.scale.reshape(96, -1), rtol=1e-3)  # fp16 scales
    restricted = quantize_weight(
        gaussian, QuantSpec(bits=4, granularity="per_group", group_size=32)
    )
    assert sqnr_db(gaussian, dequantize(q, gaussian.shape)) > sqnr_db(
        gaussian, dequantize(restricted, gaussian.shape)
    )


def test_full_range_is_refused_for_asymmetric_grids() -> None:
    with pytest.raises(ConfigError, match="full_range"):
        QuantSpec(bits=4, symmetric=False, signed=False, full_range=True)
