"""Wanda masks (exact per row and N:M) and OWL's layerwise sparsities."""

from __future__ import annotations

import itertools

import pytest
import torch

from slimtorch.core.errors import ConfigError, UnsupportedModelError, UserInputError
from slimtorch.prune.criteria import magnitude_mask
from slimtorch.prune.nm import is_nm_sparse
from slimtorch.prune.wanda import outlier_ratio, owl_sparsities, wanda_mask, wanda_scores


def _layer(seed: int, out: int = 16, inp: int = 32):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g)
    x = torch.randn(300, inp, generator=g) * torch.rand(inp, generator=g).pow(3) * 10
    return w, x, x.pow(2).sum(0)


@pytest.mark.parametrize("sparsity", [0.25, 0.5, 0.6])
def test_exact_sparsity_per_row_and_lowest_scores(sparsity: float) -> None:
    w, _, norm = _layer(0, inp=30)
    keep = wanda_mask(w, norm, sparsity)
    assert (keep.sum(1) == 30 - round(sparsity * 30)).all()
    scores = w.abs() * norm.sqrt()
    for r in range(w.shape[0]):
        assert scores[r][~keep[r]].max() <= scores[r][keep[r]].min()


def test_n_m_mask() -> None:
    w, _, norm = _layer(1)
    keep = wanda_mask(w, norm, 0.0, n=2, m=4)
    assert is_nm_sparse(w * keep, 2, 4) and (keep.reshape(-1, 4).sum(1) == 2).all()
    scores = (w.abs() * norm.sqrt()).reshape(-1, 4)
    kept = keep.reshape(-1, 4)
    pruned_max = scores.masked_fill(kept, float("-inf")).amax(1)
    kept_min = scores.masked_fill(~kept, float("inf")).amin(1)
    assert (pruned_max <= kept_min).all()


def test_uniform_norms_equal_row_magnitude() -> None:
    w, _, _ = _layer(2)
    keep = wanda_mask(w, torch.full((32,), 4.0), 0.5)
    for r in range(w.shape[0]):
        assert torch.equal(keep[r], magnitude_mask(w[r], 0.5))


def test_beats_magnitude_on_layer_output() -> None:
    for seed in range(4):
        w, x, norm = _layer(seed)
        ref = x @ w.T
        errs = [
            float((ref - x @ (w * keep).T).norm() / ref.norm())
            for keep in (wanda_mask(w, norm, 0.5), magnitude_mask(w, 0.5))
        ]
        assert errs[0] < 0.8 * errs[1]


def test_prior_and_conv_shapes() -> None:
    w, _, norm = _layer(3)
    prior = torch.ones_like(w, dtype=torch.bool)
    prior[:, 0] = False
    keep = wanda_mask(w, norm, 0.5, prior=prior)
    assert not keep[:, 0].any() and (keep.sum(1) == 16).all()
    conv = torch.randn(4, 2, 3, 3)  # matrix view [4, 18]
    keep = wanda_mask(conv, torch.rand(18), 0.5)
    assert keep.shape == conv.shape and int(keep.sum()) == 36


def test_wanda_bad_inputs() -> None:
    w, _, norm = _layer(0)
    with pytest.raises(UserInputError, match="31 entries"):
        wanda_mask(w, norm[:31], 0.5)
    with pytest.raises(ConfigError, match="sparsity"):
        wanda_mask(w, norm, 1.5)
    with pytest.raises(ConfigError, match="multiple of m=5"):
        wanda_mask(w, norm, 0.0, n=2, m=5)
    with pytest.raises(ConfigError, match="0 < n < m"):
        wanda_mask(w, norm, 0.0, n=0, m=4)
    with pytest.raises(UserInputError, match=">= 0"):
        wanda_mask(w, -norm, 0.5)
    with pytest.raises(UnsupportedModelError, match="NaN"):
        wanda_scores(w * float("nan"), norm)


def test_outlier_ratio_counts_scores_above_m_times_mean() -> None:
    w = torch.ones(2, 10)
    w[0, 0] = 100.0  # mean score = 118/20 = 5.9; only 100 > 5 * 5.9
    assert outlier_ratio([w], [torch.ones(10)], threshold=5.0) == pytest.approx(1 / 20)
    assert outlier_ratio([w, w], [torch.ones(10), torch.ones(10)]) == pytest.approx(1 / 20)
    assert outlier_ratio([w], [torch.ones(10)], threshold=20.0) == 0.0
    with pytest.raises(UserInputError, match="one input norm per weight"):
        outlier_ratio([w], [])


def test_owl_matches_the_paper_formula_when_unclipped() -> None:
    # OWL's formula stays within target +- lam only when the normalised ratios average to lam
    ratios = [0.010, 0.020, 0.040, 0.050]
    lam, target = 0.08, 0.5
    got = owl_sparsities(ratios, target, lam)
    r = torch.tensor(ratios, dtype=torch.float64)
    density = (r - r.min()) / (r.max() - r.min()) * 2 * lam
    density = density - density.mean() + (1 - target)
    torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), 1 - density)
    assert got == sorted(got, reverse=True)  # more outliers, lower sparsity


@pytest.mark.parametrize(
    "ratios,target,lam",
    [
        ([0.0, 0.0, 0.0, 0.0, 1.0], 0.7, 0.08),  # one outlier layer: clipped at target - lam
        ([0.0, 1.0, 1.0, 1.0], 0.5, 0.1),
        ([0.3, 0.1, 0.2, 0.9, 0.05], 0.95, 0.1),  # upper bound 1.0
        ([0.02, 0.02, 0.02], 0.6, 0.08),  # no spread: all at target
    ],
)
def test_owl_mean_and_bounds(ratios: list[float], target: float, lam: float) -> None:
    got = owl_sparsities(ratios, target, lam)
    assert sum(got) / len(got) == pytest.approx(target, abs=1e-9)
    assert all(target - lam - 1e-12 <= s <= min(1.0, target + lam) + 1e-12 for s in got)
    order = sorted(range(len(ratios)), key=lambda i: ratios[i])
    assert all(got[a] >= got[b] - 1e-12 for a, b in itertools.pairwise(order))


def test_owl_bad_inputs() -> None:
    with pytest.raises(UserInputError, match="at least one"):
        owl_sparsities([], 0.5)
    with pytest.raises(ConfigError, match="target"):
        owl_sparsities([0.1, 0.2], 1.0)
    with pytest.raises(ConfigError, match="lam"):
        owl_sparsities([0.1, 0.2], 0.5, lam=-0.1)
    with pytest.raises(UserInputError, match="finite"):
        owl_sparsities([0.1, float("nan")], 0.5)
