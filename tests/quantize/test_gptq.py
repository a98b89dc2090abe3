"""GPTQ maths: beats round-to-nearest on the layer output, equals it with H = I, stores exactly."""

from __future__ import annotations

import pytest
import torch

from slimtorch.core.errors import ConfigError, UnsupportedModelError, UserInputError
from slimtorch.formats.state import dequantize
from slimtorch.quantize.affine import quantize_weight
from slimtorch.quantize.gptq import gptq_quantize
from slimtorch.quantize.primitives import QuantSpec

PER_CHANNEL_4 = QuantSpec(bits=4, granularity="per_channel")
GROUP_3_ASYM = QuantSpec(bits=3, symmetric=False, granularity="per_group", group_size=16)


def _layer(seed: int, out: int = 24, inp: int = 48, rows: int = 400):
    """A weight and correlated inputs with uneven channel scales; ``H = 2/n X^T X``."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g)
    mix = torch.randn(inp, inp, generator=g) / inp**0.5 + torch.eye(inp)
    x = torch.randn(rows, inp, generator=g) @ mix * (0.2 + 3 * torch.rand(inp, generator=g))
    return w, x, 2.0 / rows * x.T @ x


def _out_err(x: torch.Tensor, w: torch.Tensor, q: torch.Tensor) -> float:
    return float((x @ w.T - x @ q.T).norm() / (x @ w.T).norm())


@pytest.mark.parametrize("spec", [PER_CHANNEL_4, GROUP_3_ASYM])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn_on_layer_output(spec: QuantSpec, act_order: bool) -> None:
    for seed in range(4):
        w, x, h = _layer(seed)
        rtn = dequantize(quantize_weight(w, spec), w.shape)
        res = gptq_quantize(w, h, spec, block_size=16, act_order=act_order, static_groups=True)
        assert _out_err(x, w, res.weight) < 0.85 * _out_err(x, w, rtn)


@pytest.mark.parametrize(
    "spec",
    [
        PER_CHANNEL_4,
        GROUP_3_ASYM,
        QuantSpec(bits=8, granularity="per_tensor"),
        QuantSpec(bits=4, signed=False, symmetric=False, granularity="per_group", group_size=20),
        QuantSpec(bits=2, granularity="per_group", group_size=8, observer="mse"),
    ],
)
def test_identity_hessian_equals_rtn_exactly(spec: QuantSpec) -> None:
    w, _, _ = _layer(5, inp=40)
    rtn = quantize_weight(w, spec)
    res = gptq_quantize(w, torch.eye(40), spec, block_size=16)
    assert torch.equal(res.weight, dequantize(rtn, w.shape))
    state = res.quant_state()
    assert torch.equal(state.codes, rtn.codes)
    assert torch.equal(state.scale, rtn.scale)
    assert torch.equal(state.zero_point, rtn.zero_point)
    assert (state.group_size, state.scale_dtype) == (rtn.group_size, rtn.scale_dtype)


@pytest.mark.parametrize("act_order", [False, True])
def test_state_round_trips_codes_to_weight(act_order: bool) -> None:
    w, _, h = _layer(1, out=10, inp=40)
    res = gptq_quantize(w, h, GROUP_3_ASYM, act_order=act_order, static_groups=True)
    state = res.quant_state()
    assert state.codes.dtype == torch.int8 and state.codes.shape == (10, 40)
    assert state.scale.shape == state.zero_point.shape == (10, 3)  # ceil(40 / 16) groups
    assert state.group_size == 16 and res.contiguous_groups()
    assert torch.equal(dequantize(state, w.shape), res.weight)
    assert int(state.codes.min()) >= -4 and int(state.codes.max()) <= 3
    if act_order:
        assert res.perm is not None and sorted(res.perm.tolist()) == list(range(40))
        assert torch.equal(res.perm, torch.argsort(torch.diagonal(h), descending=True))
    # reshaped to a conv-like weight shape through the matrix view
    assert state.codes.dtype == res.quant_state((10, 40)).codes.dtype


def test_act_order_dynamic_groups_follow_the_order() -> None:
    w, x, h = _layer(2, inp=48)
    res = gptq_quantize(w, h, GROUP_3_ASYM, act_order=True, static_groups=False)
    assert res.perm is not None
    assert torch.equal(res.g_idx[res.perm], torch.arange(48) // 16)  # groups in visiting order
    assert torch.bincount(res.g_idx).tolist() == [16, 16, 16]
    manual = (res.codes.long() - res.zero_point[:, res.g_idx]).float() * res.scale[:, res.g_idx]
    assert torch.equal(manual, res.weight)
    rtn = dequantize(quantize_weight(w, GROUP_3_ASYM), w.shape)
    assert _out_err(x, w, res.weight) < _out_err(x, w, rtn)
    with pytest.raises(ConfigError, match="static_groups"):
        res.quant_state()


def test_dead_inputs_and_mask_stay_zero() -> None:
    w, x, _ = _layer(3, out=12, inp=32)
    x[:, [3, 17]] = 0.0
    h = 2.0 / x.shape[0] * x.T @ x
    mask = torch.rand(w.shape, generator=torch.Generator().manual_seed(0)) > 0.5
    res = gptq_quantize(w, h, GROUP_3_ASYM, mask=mask, act_order=True, static_groups=True)
    assert torch.isfinite(res.weight).all()
    assert (res.weight[:, [3, 17]] == 0).all()
    assert (res.weight[~mask] == 0).all()
    state = res.quant_state()
    zp = state.zero_point.repeat_interleave(16, dim=1)[:, :32]
    assert torch.equal(state.codes.long()[~mask], zp.long()[~mask])


def test_gptq_loss_matches_its_definition_per_channel_identity() -> None:
    w, _, _ = _layer(4, inp=16)
    res = gptq_quantize(w, torch.eye(16), PER_CHANNEL_4, damp=0.0)
    expected = float((w - res.weight).pow(2).sum() / 2)
    assert res.loss == pytest.approx(expected, rel=1e-5)


def test_gptq_bad_inputs() -> None:
    w, _, h = _layer(0, out=4, inp=8)
    with pytest.raises(UserInputError, match="square"):
        gptq_quantize(w, h[:, :7], PER_CHANNEL_4)
    with pytest.raises(UserInputError, match="8 input columns"):
        gptq_quantize(w, torch.eye(6), PER_CHANNEL_4)
    with pytest.raises(UserInputError, match="to_matrix"):
        gptq_quantize(w.reshape(4, 2, 4), h, PER_CHANNEL_4)
    bad = w.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(UnsupportedModelError, match="NaN"):
        gptq_quantize(bad, h, PER_CHANNEL_4)
    with pytest.raises(UnsupportedModelError, match="NaN"):
        gptq_quantize(w, h * float("nan"), PER_CHANNEL_4)
    with pytest.raises(ConfigError, match="block_size"):
        gptq_quantize(w, h, PER_CHANNEL_4, block_size=0)
    with pytest.raises(UserInputError, match="damp"):
        gptq_quantize(w, h, PER_CHANNEL_4, damp=-1.0)
    with pytest.raises(UserInputError, match="mask shape"):
        gptq_quantize(w, h, PER_CHANNEL_4, mask=torch.ones(4, 7, dtype=torch.bool))
    with pytest.raises(UnsupportedModelError, match="increase damp"):
        gptq_quantize(w, -torch.eye(8), PER_CHANNEL_4)


@pytest.mark.parametrize("static_groups", [False, True])
def test_mse_observer_weighs_columns_by_the_hessian_diagonal(static_groups: bool) -> None:
    """A diagonal H propagates no error, so GPTQ is round-to-nearest on the ranges the mse
    search picks with each column's error weighted by ``H_jj`` (not the unweighted ones)."""
    from slimtorch.quantize.observers import mse_range
    from slimtorch.quantize.primitives import fake_quantize_blocks, round_scale_fp16, to_blocks

    g = torch.Generator().manual_seed(3)
    spec = QuantSpec(bits=4, granularity="per_group", group_size=16, observer="mse",
                     full_range=True)  # fmt: skip
    w = torch.randn(24, 64, generator=g)
    d = (0.1 + 5 * torch.rand(64, generator=g)) ** 2
    res = gptq_quantize(w, torch.diag(d), spec, block_size=16, static_groups=static_groups)
    blocks = to_blocks(w, spec)
    for weights in (to_blocks(d.unsqueeze(0), spec), None):
        lo, hi = mse_range(blocks, spec, weights=weights)
        scale = round_scale_fp16(-torch.where(hi.abs() >= lo.abs(), hi, lo) / 8)[0]
        expected = fake_quantize_blocks(blocks, -8 * scale, -8 * scale, spec).reshape(w.shape)
        if weights is not None:
            assert torch.equal(res.weight, expected)
        else:
            assert not torch.equal(res.weight, expected)
