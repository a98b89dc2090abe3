"""N:M masks on every layer layout, the checker, and the divisibility error."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from slimtorch.core.errors import ConfigError
from slimtorch.graph.weights import to_matrix
from slimtorch.prune.nm import is_nm_sparse, nm_mask


def _gen(seed: int = 0) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def _layers() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {
        "linear": nn.Linear(16, 8).weight.detach(),
        "conv2d": nn.Conv2d(8, 4, 3).weight.detach(),
        "conv1d": nn.Conv1d(8, 6, 5).weight.detach(),
        "embedding": nn.Embedding(20, 16).weight.detach(),
        "lstm_ih": nn.LSTM(8, 8).weight_ih_l0.detach(),
        "lstm_hh": nn.LSTM(8, 8).weight_hh_l0.detach(),
    }


@pytest.mark.parametrize(("n", "m"), [(2, 4), (4, 8), (1, 4), (3, 4), (1, 2)])
@pytest.mark.parametrize("layer", list(_layers()))
def test_nm_mask_keeps_n_largest_per_group(layer: str, n: int, m: int) -> None:
    w = _layers()[layer]
    mask = nm_mask(w, n, m, layer)
    assert mask.shape == w.shape and mask.dtype == torch.bool
    groups_w = to_matrix(w).reshape(-1, m).abs()
    groups_k = to_matrix(mask).reshape(-1, m)
    assert (groups_k.sum(dim=1) == n).all()
    kept_min = torch.where(groups_k, groups_w, torch.inf).min(dim=1).values
    pruned_max = torch.where(~groups_k, groups_w, -torch.inf).max(dim=1).values
    assert (pruned_max <= kept_min).all()
    assert is_nm_sparse(w * mask, n, m)
    assert float((~mask).float().mean()) == pytest.approx(1 - n / m)


def test_conv_groups_run_along_input_channels() -> None:
    w = torch.zeros(1, 4, 2, 2)
    # give each input channel a distinct magnitude at every kernel position
    for c in range(4):
        w[0, c] = float(c + 1)
    mask = nm_mask(w, 2, 4)
    # channels 2 and 3 (the largest) are kept at every kernel position
    assert mask[0, 2:].all() and not mask[0, :2].any()


def test_ties_keep_earlier_positions() -> None:
    w = torch.ones(2, 8)
    mask = nm_mask(w, 2, 4)
    assert mask[0].tolist() == [True, True, False, False, True, True, False, False]


def test_prior_mask_is_respected() -> None:
    w = torch.randn(4, 8, generator=_gen(1))
    prior = torch.ones_like(w, dtype=torch.bool)
    prior[:, 0] = False
    mask = nm_mask(w * prior, 2, 4, prior=prior)
    assert not mask[:, 0].any()
    assert (to_matrix(mask).reshape(-1, 4).sum(dim=1) == 2).all()


def test_is_nm_sparse() -> None:
    w = torch.tensor([[1.0, 0.0, 2.0, 0.0, 0.0, 0.0, 3.0, 4.0]])
    assert is_nm_sparse(w, 2, 4)
    assert not is_nm_sparse(w, 1, 4)
    assert is_nm_sparse(w, 3, 4)
    assert not is_nm_sparse(torch.randn(2, 8, generator=_gen(2)), 2, 4)
    assert not is_nm_sparse(torch.zeros(2, 6), 2, 4)  # 6 is not divisible by 4
    conv = torch.zeros(2, 4, 3, 3)
    conv[:, :2] = 1.0  # two of four input channels at every position
    assert is_nm_sparse(conv, 2, 4) and not is_nm_sparse(conv, 1, 4)


def test_conv_input_not_divisible_names_layer_and_fix() -> None:
    w = nn.Conv2d(3, 8, 3).weight.detach()  # 27 = 3*9 flattened, but 3 channels
    with pytest.raises(ConfigError, match=r"'features\.0'.*input size 3.*m=4.*`ignore`"):
        nm_mask(w, 2, 4, "features.0")
    with pytest.raises(ConfigError, match="input size 10"):
        nm_mask(torch.randn(4, 10), 2, 4, "fc")


@pytest.mark.parametrize(("n", "m"), [(4, 4), (0, 4), (5, 4)])
def test_bad_nm(n: int, m: int) -> None:
    with pytest.raises(ConfigError, match="0 < n < m"):
        nm_mask(torch.randn(4, 8), n, m)
