"""Pure pruning criteria: exact counts, ties, thresholds, random and probabilistic masks."""

from __future__ import annotations

import pytest
import torch

from slimtorch.core.errors import ConfigError
from slimtorch.prune.criteria import (
    global_magnitude_masks,
    lowest_k_mask,
    magnitude_mask,
    num_pruned,
    probabilistic_mask,
    random_mask,
    threshold_mask,
)


def _gen(seed: int = 0) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.25, 0.5, 0.77, 0.99])
@pytest.mark.parametrize("shape", [(7,), (13, 11), (4, 3, 5, 5)])
def test_magnitude_exact_count_and_smallest(sparsity: float, shape: tuple[int, ...]) -> None:
    w = torch.randn(shape, generator=_gen(1))
    mask = magnitude_mask(w, sparsity)
    assert mask.dtype == torch.bool and mask.shape == w.shape
    k = round(sparsity * w.numel())
    assert int((~mask).sum()) == k
    if 0 < k < w.numel():
        assert w.abs()[~mask].max() <= w.abs()[mask].min()


def test_magnitude_ties_broken_by_position_deterministically() -> None:
    w = torch.tensor([1.0, -1.0, 1.0, 1.0, 2.0, -1.0, 3.0, 1.0])
    mask = magnitude_mask(w, 0.5)  # prune 4 of the six tied |w| = 1: the first four positions
    assert mask.tolist() == [False, False, False, False, True, True, True, True]
    assert torch.equal(mask, magnitude_mask(w.clone(), 0.5))


def test_all_equal_weights_still_exact() -> None:
    w = torch.full((10, 10), 0.3)
    assert int((~magnitude_mask(w, 0.37)).sum()) == 37


def test_lowest_k_edges() -> None:
    s = torch.tensor([3.0, 1.0, 2.0])
    assert lowest_k_mask(s, 0).all()
    assert not lowest_k_mask(s, 3).any()
    assert lowest_k_mask(s, 1).tolist() == [True, False, True]


def test_num_pruned_rejects_out_of_range() -> None:
    with pytest.raises(ConfigError, match="sparsity"):
        num_pruned(10, 1.5)


def test_magnitude_with_prior_reaches_exact_count_and_keeps_old_zeros() -> None:
    w = torch.randn(20, 20, generator=_gen(2))
    prior = torch.rand(20, 20, generator=_gen(3)) > 0.3  # random, not magnitude-based
    w_eff = w * prior
    mask = magnitude_mask(w_eff, 0.6, prior)
    assert int((~mask).sum()) == round(0.6 * 400)
    assert not (mask & ~prior).any()  # nothing pruned comes back


def test_global_exact_total_and_single_threshold() -> None:
    ws = [torch.randn(30, 20, generator=_gen(4)) * 0.1, torch.randn(50, generator=_gen(5)) * 2.0]
    masks = global_magnitude_masks(ws, 0.7)
    total = sum(w.numel() for w in ws)
    assert sum(int((~m).sum()) for m in masks) == round(0.7 * total)
    kept_min = min(float(w.abs()[m].min()) for w, m in zip(ws, masks))
    pruned_max = max(float(w.abs()[~m].max()) for w, m in zip(ws, masks))
    assert pruned_max <= kept_min
    # the small-scale layer loses far more than the large-scale one
    assert (~masks[0]).float().mean() > 0.74 and (~masks[1]).float().mean() < 0.1


def test_global_with_priors_and_empty() -> None:
    assert global_magnitude_masks([], 0.5) == []
    w = torch.randn(10, 10, generator=_gen(6))
    prior = magnitude_mask(w, 0.2)
    (mask,) = global_magnitude_masks([w * prior], 0.5, [prior])
    assert int((~mask).sum()) == 50 and not (mask & ~prior).any()


def test_threshold_value_and_std() -> None:
    w = torch.tensor([[0.1, -0.2, 0.5], [-0.05, 0.3, -0.6]])
    assert threshold_mask(w, value=0.25).tolist() == [[False, False, True], [False, True, True]]
    w2 = torch.randn(1000, generator=_gen(7))
    mask = threshold_mask(w2, std_k=1.0)
    assert torch.equal(mask, w2.abs() >= w2.std())
    # about 68% of a Gaussian lies within one std
    assert 0.62 < float((~mask).float().mean()) < 0.74


@pytest.mark.parametrize("kwargs", [{}, {"value": 0.1, "std_k": 1.0}])
def test_threshold_needs_exactly_one(kwargs: dict[str, float]) -> None:
    with pytest.raises(ConfigError, match="exactly one of `value` or `std_k`"):
        threshold_mask(torch.randn(4), **kwargs)


def test_random_rate_is_approximate_and_seeded() -> None:
    w = torch.randn(200, 200)
    mask = random_mask(w, 0.3, _gen(8))
    assert abs(float((~mask).float().mean()) - 0.3) < 0.01
    assert torch.equal(mask, random_mask(w, 0.3, _gen(8)))
    assert not torch.equal(mask, random_mask(w, 0.3, _gen(9)))


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.9])
def test_probabilistic_exact_count_and_reproducible(sparsity: float) -> None:
    w = torch.randn(17, 23, generator=_gen(10))
    mask = probabilistic_mask(w, sparsity, _gen(11))
    assert int((~mask).sum()) == round(sparsity * w.numel())
    assert torch.equal(mask, probabilistic_mask(w, sparsity, _gen(11)))


def test_probabilistic_keeps_important_weights_more_often() -> None:
    w = torch.linspace(0.01, 1.0, 100)  # |w| grows with the index
    counts = torch.zeros(100)
    gen = _gen(12)
    for _ in range(300):
        counts += probabilistic_mask(w, 0.5, gen).float()
    low, high = counts[:25].mean(), counts[-25:].mean()
    assert high > 3 * low  # the largest quarter is kept far more often than the smallest
    assert high > 0.7 * 300
    # power sharpens it: with power=4 the smallest quarter is almost never kept
    sharp = sum(probabilistic_mask(w, 0.5, gen, power=4.0).float() for _ in range(100))
    assert float(sharp[:25].mean()) < 0.05 * 100
    # and it is not plain magnitude pruning: small weights do survive sometimes
    assert float(low) > 0


def test_probabilistic_power_zero_is_uniform_over_nonzeros() -> None:
    w = torch.linspace(0.01, 1.0, 100)
    gen = _gen(13)
    counts = sum(probabilistic_mask(w, 0.5, gen, power=0.0).float() for _ in range(400))
    assert abs(float(counts[:50].mean() - counts[50:].mean())) < 0.1 * 400


def test_probabilistic_prunes_zeros_first() -> None:
    w = torch.tensor([0.0, 0.0, 1.0, 2.0, 3.0, 0.0])
    mask = probabilistic_mask(w, 0.5, _gen(14))
    assert mask.tolist() == [False, False, True, True, True, False]
    with pytest.raises(ConfigError, match="power"):
        probabilistic_mask(w, 0.5, _gen(14), power=-1.0)
