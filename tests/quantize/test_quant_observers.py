"""Range observers: min-max and the MSE-optimal clipping search."""

from __future__ import annotations

import torch

from slimtorch.formats.state import dequantize
from slimtorch.quantize.affine import quantize_weight
from slimtorch.quantize.observers import minmax_range, mse_range
from slimtorch.quantize.primitives import QuantSpec, fake_quantize_blocks, to_blocks


def test_minmax_range() -> None:
    blocks = torch.tensor([[[1.0, -2.0, 3.0]], [[0.5, 0.25, 0.0]]])
    lo, hi = minmax_range(blocks)
    assert lo.tolist() == [[-2.0], [0.0]] and hi.tolist() == [[3.0], [0.5]]


def test_mse_never_worse_per_block() -> None:
    w = torch.randn(64, 96, generator=torch.Generator().manual_seed(0))
    w[0, 0] = 12.0  # an outlier makes clipping worthwhile
    for spec in (
        QuantSpec(bits=3),
        QuantSpec(bits=4, symmetric=False, signed=False),
        QuantSpec(bits=4, granularity="per_group", group_size=32),
    ):
        blocks = to_blocks(w, spec)
        lo_m, hi_m = minmax_range(blocks)
        lo_s, hi_s = mse_range(blocks, spec)
        err_m = (fake_quantize_blocks(blocks, lo_m, hi_m, spec) - blocks).pow(2).sum(-1)
        err_s = (fake_quantize_blocks(blocks, lo_s, hi_s, spec) - blocks).pow(2).sum(-1)
        assert bool((err_s <= err_m).all())
        assert float(err_s.sum()) < 0.9 * float(err_m.sum())
        assert bool((hi_s <= hi_m).all()) and bool((lo_s >= lo_m).all())


def test_mse_observer_through_quantize_weight() -> None:
    w = torch.randn(32, 128, generator=torch.Generator().manual_seed(1))
    e_minmax = (dequantize(quantize_weight(w, QuantSpec(bits=4)), w.shape) - w).pow(2).sum()
    q = quantize_weight(w, QuantSpec(bits=4, observer="mse"))
    e_mse = (dequantize(q, w.shape) - w).pow(2).sum()
    assert float(e_mse) < float(e_minmax)


def test_mse_on_zero_and_masked_blocks() -> None:
    w = torch.zeros(4, 16)
    w[1] = torch.linspace(-1, 1, 16)
    mask = torch.ones_like(w, dtype=torch.bool)
    mask[1, :8] = False
    q = quantize_weight(w, QuantSpec(bits=4, observer="mse"), mask)
    d = dequantize(q, w.shape)
    assert torch.isfinite(d).all()
    assert bool((d[0] == 0).all()) and bool((d[1, :8] == 0).all())


def test_weighted_mse_minimises_the_weighted_error() -> None:
    g = torch.Generator().manual_seed(2)
    spec = QuantSpec(bits=4, granularity="per_group", group_size=32, full_range=True)
    blocks = to_blocks(torch.randn(16, 128, generator=g), spec)
    weights = to_blocks((torch.rand(1, 128, generator=g) * 10) ** 2, spec)  # [1, groups, 32]

    def weighted_err(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        return ((fake_quantize_blocks(blocks, lo, hi, spec) - blocks).pow(2) * weights).sum(-1)

    plain = weighted_err(*mse_range(blocks, spec))
    weighted = weighted_err(*mse_range(blocks, spec, weights=weights))
    assert bool((weighted <= plain).all())
    assert float(weighted.sum()) < float(plain.sum())
    ones = mse_range(blocks, spec, weights=torch.ones_like(weights))
    assert all(torch.equal(a, b) for a, b in zip(ones, mse_range(blocks, spec)))
