"""The Frechet distance between feature Gaussians (eval/fid.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from slimtorch.core.errors import UserInputError
from slimtorch.eval.fid import feature_fid, frechet_distance, gaussian_stats, module_features


def _features(n: int = 2000, d: int = 8, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=gen)
    return torch.randn(n, d, generator=gen) @ mix


def test_identical_sets_are_at_distance_zero() -> None:
    x = _features()
    assert feature_fid(x, x) == pytest.approx(0.0, abs=1e-8)


def test_the_distance_grows_with_a_shift() -> None:
    x = _features()
    shifts = [0.0, 0.5, 1.0, 2.0]
    values = [feature_fid(x, x + s) for s in shifts]
    d = x.shape[1]
    for s, v in zip(shifts, values, strict=True):
        assert v == pytest.approx(d * s * s, rel=1e-6, abs=1e-8)  # the means' term alone
    assert values == sorted(values)
    assert feature_fid(x, 2.0 * x) > 1.0  # a change of scale: the covariance term


def test_closed_form_for_diagonal_gaussians() -> None:
    mu1, mu2 = torch.zeros(3), torch.tensor([1.0, 0.0, 2.0])
    s1, s2 = torch.diag(torch.tensor([1.0, 4.0, 9.0])), torch.diag(torch.tensor([4.0, 1.0, 1.0]))
    # ||dmu||^2 + sum (sqrt(a) - sqrt(b))^2 for diagonal covariances
    expected = 5.0 + (1 - 2) ** 2 + (2 - 1) ** 2 + (3 - 1) ** 2
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(mu2, s2, mu1, s1) == pytest.approx(expected, rel=1e-9)


def test_two_samples_of_one_distribution_are_close_and_bad_inputs_are_refused() -> None:
    a = _features(seed=0)
    assert feature_fid(a[:1000], a[1000:]) < 0.1 * feature_fid(a, a + 1.0)
    with pytest.raises(UserInputError, match="rows"):
        gaussian_stats(torch.zeros(1, 4))
    with pytest.raises(UserInputError, match="different sizes"):
        frechet_distance(torch.zeros(2), torch.eye(2), torch.zeros(3), torch.eye(3))


def test_module_features_reads_a_named_module() -> None:
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2)).train()
    x = torch.randn(7, 4)
    rows = module_features(model, "0", x, batch_size=3, after=torch.relu)
    torch.testing.assert_close(rows, torch.relu(model[0](x)).detach())
    assert model.training  # the mode comes back
