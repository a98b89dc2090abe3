"""SparseGPT maths: exact sparsity and N:M, better reconstruction than magnitude, joint quant."""

from __future__ import annotations

import pytest
import torch

from slimtorch.core.errors import ConfigError, UnsupportedModelError, UserInputError
from slimtorch.formats.state import dequantize
from slimtorch.prune.criteria import magnitude_mask
from slimtorch.prune.nm import is_nm_sparse, nm_mask
from slimtorch.prune.sparsegpt import sparsegpt_prune
from slimtorch.quantize.gptq import ColumnGrid
from slimtorch.quantize.primitives import QuantSpec


def _layer(seed: int, out: int = 24, inp: int = 48, rows: int = 400):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g)
    mix = torch.randn(inp, inp, generator=g) / inp**0.5 + torch.eye(inp)
    x = torch.randn(rows, inp, generator=g) @ mix * (0.2 + 3 * torch.rand(inp, generator=g))
    return w, x, 2.0 / rows * x.T @ x


def _out_err(x: torch.Tensor, w: torch.Tensor, q: torch.Tensor) -> float:
    return float((x @ w.T - x @ q.T).norm() / (x @ w.T).norm())


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.77])
def test_exact_unstructured_sparsity(sparsity: float) -> None:
    w, _, h = _layer(0, out=10, inp=37)  # 37 columns: the last block is partial
    pruned, keep = sparsegpt_prune(w, h, sparsity, block_size=8)
    assert int((~keep).sum()) == round(sparsity * w.numel())
    assert (pruned[~keep] == 0).all() and torch.isfinite(pruned).all()
    assert pruned.dtype == w.dtype and keep.dtype == torch.bool


def test_exact_n_m_pattern() -> None:
    w, _, h = _layer(1, out=8, inp=48)
    pruned, keep = sparsegpt_prune(w, h, 0.0, n=2, m=4, block_size=18)  # rounded to 16
    assert is_nm_sparse(pruned, 2, 4)
    assert (keep.reshape(-1, 4).sum(1) == 2).all()
    assert (pruned[~keep] == 0).all()


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_beats_magnitude_reconstruction(pattern: str) -> None:
    for seed in range(4):
        w, x, h = _layer(seed)
        if pattern == "2:4":
            pruned, _ = sparsegpt_prune(w, h, 0.0, n=2, m=4, block_size=16)
            baseline = w * nm_mask(w, 2, 4)
        else:
            pruned, _ = sparsegpt_prune(w, h, 0.5, block_size=16)
            baseline = w * magnitude_mask(w, 0.5)
        assert _out_err(x, w, pruned) < 0.75 * _out_err(x, w, baseline)


def test_identity_hessian_is_magnitude_pruning() -> None:
    w, _, _ = _layer(2, out=6, inp=20)
    pruned, keep = sparsegpt_prune(w, torch.eye(20), 0.4, block_size=32)
    assert torch.equal(keep, magnitude_mask(w, 0.4))
    assert torch.equal(pruned, w * keep)


def test_joint_quantization_is_stored_exactly() -> None:
    w, x, h = _layer(3, out=16, inp=32)
    spec = QuantSpec(bits=4, symmetric=False, granularity="per_group", group_size=16)
    grid = ColumnGrid(spec, 16, 32)
    pruned, keep = sparsegpt_prune(w, h, 0.0, n=2, m=4, block_size=16, quantizer=grid)
    state = grid.result(pruned).quant_state()
    assert torch.equal(dequantize(state, w.shape), pruned)
    assert is_nm_sparse(pruned, 2, 4)
    zp = state.zero_point.repeat_interleave(16, dim=1)
    assert torch.equal(state.codes.long()[~keep], zp.long()[~keep])
    plain, _ = sparsegpt_prune(w, h, 0.0, n=2, m=4, block_size=16)
    assert _out_err(x, w, pruned) < 1.5 * _out_err(x, w, plain)


def test_prior_mask_stays_pruned() -> None:
    w, _, h = _layer(4, out=8, inp=16)
    prior = torch.ones_like(w, dtype=torch.bool)
    prior[:, :3] = False  # 24 of 128 already pruned
    _, keep = sparsegpt_prune(w, h, 0.5, block_size=8, prior=prior)
    assert not keep[:, :3].any() and int((~keep).sum()) == 64
    _, keep = sparsegpt_prune(w, h, 0.0, n=2, m=4, prior=prior)
    assert not keep[:, :3].any() and (keep.reshape(-1, 4).sum(1) <= 2).all()


def test_sparsegpt_bad_inputs() -> None:
    w, _, h = _layer(0, out=4, inp=10)
    with pytest.raises(ConfigError, match=r"\[0, 1\)"):
        sparsegpt_prune(w, h, 1.0)
    with pytest.raises(ConfigError, match=r"\[0, 1\)"):
        sparsegpt_prune(w, h, -0.1)
    with pytest.raises(ConfigError, match="0 < n < m"):
        sparsegpt_prune(w, h, 0.0, n=4, m=2)
    with pytest.raises(ConfigError, match="multiple of m=4"):
        sparsegpt_prune(w, h, 0.0, n=2, m=4)
    with pytest.raises(UserInputError, match="square"):
        sparsegpt_prune(w, h[:3], 0.5)
    with pytest.raises(UserInputError, match="10 input columns"):
        sparsegpt_prune(w, torch.eye(9), 0.5)
    with pytest.raises(UnsupportedModelError, match="NaN"):
        sparsegpt_prune(w * float("nan"), h, 0.5)
    with pytest.raises(ConfigError, match="block_size"):
        sparsegpt_prune(w, h, 0.5, block_size=0)
