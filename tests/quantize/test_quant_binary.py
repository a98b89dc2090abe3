"""Binary (XNOR-Net) and ternary (TWN) weights."""

from __future__ import annotations

import pytest
import torch

from slimtorch.core.errors import ConfigError
from slimtorch.formats.state import WeightState, dequantize, effective_weight
from slimtorch.quantize.binary import binarize, ternarize


@pytest.fixture
def w() -> torch.Tensor:
    return torch.randn(12, 40, generator=torch.Generator().manual_seed(0))


def test_binary_values_and_alpha(w: torch.Tensor) -> None:
    q = binarize(w)
    assert q.scheme == "binary" and q.bits == 1 and q.scale.shape == (12, 1)
    assert set(q.codes.unique().tolist()) == {0, 1}
    d = dequantize(q, w.shape)
    alpha = w.abs().mean(1, keepdim=True)
    assert torch.allclose(d.abs(), alpha.expand_as(w), rtol=1e-3)
    assert bool((torch.sign(d) == torch.sign(w)).all())
    for row in range(12):
        assert d[row].abs().unique().numel() == 1


def test_binary_masked(w: torch.Tensor) -> None:
    mask = torch.rand(w.shape, generator=torch.Generator().manual_seed(1)) > 0.5
    q = binarize(w, mask)
    alpha = (w.abs() * mask).sum(1) / mask.sum(1)
    assert torch.allclose(q.scale.flatten(), alpha, rtol=1e-3)
    eff = effective_weight(WeightState(mask=mask, quant=q), w)
    assert bool((eff[~mask] == 0).all())
    assert set(eff[mask].abs().div(q.scale.expand_as(w)[mask]).round().unique().tolist()) == {1.0}


def test_ternary_values_and_threshold(w: torch.Tensor) -> None:
    q = ternarize(w, ratio=0.7)
    assert q.scheme == "ternary" and q.bits == 2
    assert set(q.codes.unique().tolist()) == {0, 1, 2}
    delta = 0.7 * w.abs().mean(1, keepdim=True)
    expected_codes = 1 + (w > delta).int() - (w < -delta).int()
    assert torch.equal(q.codes.int(), expected_codes)
    big = w.abs() > delta
    alpha = (w.abs() * big).sum(1) / big.sum(1)
    assert torch.allclose(q.scale.flatten(), alpha, rtol=1e-3)
    d = dequantize(q, w.shape)
    for row in range(12):
        vals = set(d[row].unique().tolist())
        a = float(q.scale[row])
        assert vals == {-a, 0.0, a}


def test_ternary_masked_and_zero_rows(w: torch.Tensor) -> None:
    w = w.clone()
    w[5] = 0
    mask = torch.ones_like(w, dtype=torch.bool)
    mask[:, ::2] = False
    q = ternarize(w, mask, ratio=0.5)
    assert bool((q.codes[~mask] == 1).all())
    d = dequantize(q, w.shape)
    assert torch.isfinite(d).all() and bool((d[5] == 0).all())


def test_ternary_bad_ratio(w: torch.Tensor) -> None:
    with pytest.raises(ConfigError):
        ternarize(w, ratio=0.0)
