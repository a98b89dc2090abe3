"""Channel permutation search for N:M sparsity: objective, optimality on small cases, errors."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from slimtorch.core.errors import ConfigError
from slimtorch.prune.nm import nm_mask
from slimtorch.prune.permutation import (
    channel_matrix,
    find_permutation,
    nm_kept_magnitude,
    permuted_kept_magnitude,
    search_permutation,
)


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _brute_force(matrices: list[torch.Tensor], n: int, m: int) -> float:
    """Best kept magnitude over every split of 8 columns into two groups of 4."""
    c = matrices[0].shape[1]
    assert c == 2 * m
    best = 0.0
    for rest in itertools.combinations(range(1, c), m - 1):
        first = [0, *rest]
        perm = torch.tensor(first + [i for i in range(c) if i not in first])
        best = max(best, permuted_kept_magnitude(matrices, perm, n, m))
    return best


@pytest.mark.parametrize(("n", "m"), [(2, 4), (1, 4), (3, 4), (4, 8)])
def test_kept_magnitude_matches_nm_mask(n: int, m: int) -> None:
    w = _randn(6, 16)
    assert nm_kept_magnitude(w, n, m) == pytest.approx(float((w.abs() * nm_mask(w, n, m)).sum()))
    assert nm_kept_magnitude(torch.ones(3, 8), 2, 4) == 12.0


def test_conv_channel_matrix_holds_the_nm_groups() -> None:
    w = _randn(5, 8, 3, 3, seed=1)
    mat = channel_matrix(w)
    assert mat.shape == (5 * 9, 8)
    kept = float((w.abs() * nm_mask(w, 2, 4)).sum())
    assert nm_kept_magnitude(mat, 2, 4) == pytest.approx(kept)
    perm = find_permutation([mat], 2, 4).perm
    permuted = w[:, perm]  # reorder the conv's input channels
    assert nm_kept_magnitude(channel_matrix(permuted), 2, 4) == pytest.approx(
        float((permuted.abs() * nm_mask(permuted, 2, 4)).sum())
    )


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize(("n", "m", "shape"), [(2, 4, (32, 64)), (1, 4, (16, 32)), (4, 8, (8, 64))])
def test_search_never_loses_and_reports_its_objective(
    seed: int, n: int, m: int, shape: tuple[int, int]
) -> None:
    mats = [_randn(*shape, seed=seed), _randn(shape[0] // 2, shape[1], seed=seed + 100)]
    result = find_permutation(mats, n, m, seed=seed)
    perm = result.perm
    assert perm.dtype == torch.int64 and torch.equal(perm.sort().values, torch.arange(shape[1]))
    identity = sum(nm_kept_magnitude(w, n, m) for w in mats)
    assert result.identity_kept == pytest.approx(identity, rel=1e-12)
    direct = sum(nm_kept_magnitude(w[:, perm], n, m) for w in mats)
    assert result.kept == pytest.approx(direct, rel=1e-12)
    assert result.kept > identity * 1.002  # random weights always leave something to gain
    assert torch.equal(search_permutation(mats, n, m, seed=seed), perm)


def test_constructed_case_separates_the_large_columns() -> None:
    w = torch.full((4, 8), 0.1)
    w[:, 0], w[:, 1], w[:, 2] = 5.0, 4.0, 3.0  # identity: three large columns share group 0
    identity = nm_kept_magnitude(w, 2, 4)
    assert identity == pytest.approx(4 * 9.2)
    best = _brute_force([w], 2, 4)
    assert best == pytest.approx(4 * 12.1)  # {5, 4, .1, .1} + {3, .1, .1, .1}
    perm = search_permutation([w], 2, 4)
    assert nm_kept_magnitude(w[:, perm], 2, 4) == pytest.approx(best)


@pytest.mark.parametrize("seed", range(8))
def test_search_reaches_the_brute_force_optimum_on_eight_columns(seed: int) -> None:
    mats = [_randn(5, 8, seed=seed), _randn(3, 8, seed=seed + 50)]
    result = find_permutation(mats, 2, 4, seed=seed)
    assert result.kept == pytest.approx(_brute_force(mats, 2, 4), rel=1e-9)


def test_deterministic_for_a_seed() -> None:
    w = _randn(64, 128, seed=3)
    first = search_permutation([w], 2, 4, seed=7)
    assert torch.equal(first, search_permutation([w], 2, 4, seed=7))
    assert torch.equal(
        find_permutation([w], 2, 4, seed=7).perm, find_permutation([w], 2, 4, seed=7).perm
    )


def test_returns_identity_when_nothing_improves() -> None:
    w = torch.ones(4, 16)  # every order keeps the same magnitude
    result = find_permutation([w], 2, 4)
    assert torch.equal(result.perm, torch.arange(16)) and result.kept == result.identity_kept
    assert result.gain == 0.0


def test_budget_and_iteration_limits_keep_a_valid_order() -> None:
    w = _randn(32, 64, seed=4)
    identity = nm_kept_magnitude(w, 2, 4)
    for perm in (
        search_permutation([w], 2, 4, time_budget=0.0),
        search_permutation([w], 2, 4, max_iters=1),
    ):
        assert torch.equal(perm.sort().values, torch.arange(64))
        assert nm_kept_magnitude(w[:, perm], 2, 4) >= identity
    full = find_permutation([w], 2, 4)
    assert full.kept >= nm_kept_magnitude(w[:, search_permutation([w], 2, 4, max_iters=1)], 2, 4)


def test_producer_and_consumer_permuted_together_compute_the_same() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 5))
    x = _randn(7, 12, seed=9)
    before = net(x)
    first, second = net[0], net[2]
    assert isinstance(first, nn.Linear) and isinstance(second, nn.Linear)
    result = find_permutation([second.weight.detach()], 2, 4)
    assert result.kept > result.identity_kept
    with torch.no_grad():
        first.weight.copy_(first.weight[result.perm])
        first.bias.copy_(first.bias[result.perm])
        second.weight.copy_(second.weight[:, result.perm])
    torch.testing.assert_close(net(x), before, rtol=1e-5, atol=1e-6)
    assert nm_kept_magnitude(second.weight.detach(), 2, 4) == pytest.approx(result.kept)


def test_bad_inputs_name_the_sizes() -> None:
    w = _randn(4, 10)
    with pytest.raises(ValueError, match=r"10 input columns.*m=4"):
        search_permutation([w], 2, 4)
    with pytest.raises(ValueError, match=r"10 is not divisible by m=4"):
        nm_kept_magnitude(w, 2, 4)
    with pytest.raises(ValueError, match=r"0 < n < m, got n=4, m=4"):
        search_permutation([_randn(4, 8)], 4, 4)
    with pytest.raises(ValueError, match=r"0 < n < m"):
        nm_kept_magnitude(_randn(4, 8), 5, 4)
    with pytest.raises(ConfigError, match=r"one C"):
        search_permutation([_randn(4, 8), _randn(4, 12)], 2, 4)
    with pytest.raises(ConfigError, match=r"at least one matrix"):
        search_permutation([], 2, 4)
    with pytest.raises(ConfigError, match=r"channel_matrix"):
        nm_kept_magnitude(_randn(2, 4, 3, 3), 2, 4)
