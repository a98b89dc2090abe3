"""The runtime modules of rotation-based quantization: the online Hadamard transform in front of
a Linear and per-token activation fake quantization (config round trip, exact arithmetic)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from slimtorch.quantize.rotation import hadamard_factor, hadamard_matrix
from slimtorch.runtime import RUNTIME_MODULES
from slimtorch.runtime.act_quant import ActQuantLinear, fake_quantize_tokens
from slimtorch.runtime.hadamard import OnlineHadamardLinear, fwht, hadamard_transform


def test_registered_for_the_artifact() -> None:
    assert RUNTIME_MODULES.get("OnlineHadamardLinear") is OnlineHadamardLinear
    assert RUNTIME_MODULES.get("ActQuantLinear") is ActQuantLinear


@pytest.mark.parametrize("n", [64, 576, 1536])
def test_online_hadamard_is_the_dense_transform(n: int) -> None:
    m = hadamard_factor(n)
    assert m is not None
    factor = hadamard_matrix(m) / math.sqrt(m)
    linear = nn.Linear(n, 5)
    mod = OnlineHadamardLinear(linear, factor)
    t = mod.matrix()
    assert torch.allclose(t, hadamard_matrix(n) / math.sqrt(n), atol=1e-7)
    x = torch.randn(3, 2, n)
    assert torch.allclose(mod.transform(x).double(), x.double() @ t, atol=1e-5)
    # the function is kept when the wrapped weight absorbs T: (x T)(W T)^T = x W^T
    want = linear(x)
    with torch.no_grad():
        linear.weight.copy_((linear.weight.double() @ t).float())
    assert torch.allclose(mod(x), want, atol=1e-4)
    again = OnlineHadamardLinear.from_config(mod.config())
    again.load_state_dict(mod.state_dict())
    assert torch.equal(again(x), mod(x))


def test_fwht_matches_sylvester_and_rejects_odd_widths() -> None:
    x = torch.randn(4, 16, dtype=torch.float64)
    assert torch.allclose(fwht(x), x @ hadamard_matrix(16) / 4)
    assert torch.equal(hadamard_transform(x, torch.ones(1, 1)), fwht(x))
    with pytest.raises(ValueError, match="power-of-two"):
        fwht(torch.randn(2, 12))
    with pytest.raises(ValueError, match="power of"):
        OnlineHadamardLinear(nn.Linear(24, 2), torch.eye(5))


@pytest.mark.parametrize("symmetric", [True, False])
def test_fake_quantize_tokens_grid(symmetric: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 64, generator=gen) * torch.arange(1, 7)[:, None] + (0 if symmetric else 1)
    for bits in (4, 8):
        q = fake_quantize_tokens(x, bits, symmetric)
        levels = [len(torch.unique(row)) for row in q]
        assert max(levels) <= 2**bits
        span = x.amax(-1) - x.amin(-1) if not symmetric else 2 * x.abs().amax(-1)
        step = span / (2**bits - (2 if symmetric else 1))
        assert bool(((q - x).abs().amax(-1) <= step * 0.5 + 1e-5).all())
    clipped = fake_quantize_tokens(x, 4, symmetric, clip=0.5)
    assert float(clipped.abs().max()) < float(x.abs().max())


def test_act_quant_linear_round_trip_and_bad_options() -> None:
    linear = nn.Linear(16, 4)
    mod = ActQuantLinear(linear, 4, symmetric=False, clip=0.9)
    x = torch.randn(3, 16)
    assert torch.equal(mod(x), linear(fake_quantize_tokens(x, 4, False, 0.9)))
    again = ActQuantLinear.from_config(mod.config())
    again.load_state_dict(mod.state_dict())
    assert torch.equal(again(x), mod(x))
    with pytest.raises(ValueError, match="bits"):
        ActQuantLinear(linear, 1)
