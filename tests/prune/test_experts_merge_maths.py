"""The maths of expert merging (prune/experts_merge.py): output similarity, groups, averages."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from slimtorch.prune.experts_merge import (
    OutputGram,
    check_mergeable,
    group_weights,
    merge_groups,
    merged_parameters,
    weighted_average,
)


def test_cosine_of_outputs_over_the_same_tokens() -> None:
    gram = OutputGram(4)
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    # expert 1 = 3 * expert 0 (cosine 1); expert 3 silent
    gram.add(torch.stack([a, 3 * a, torch.tensor([[1.0, 1.0], [0.0, 0.0]]), torch.zeros(2, 2)]))
    gram.add(torch.stack([a[:1], 3 * a[:1], torch.tensor([[0.0, 1.0]]), torch.zeros(1, 2)]))
    cos = gram.cosine()
    assert cos[0, 1] == pytest.approx(1.0) and cos[1, 0] == pytest.approx(1.0)
    # over both batches e0 = [1,0, 0,2, 1,0], e2 = [1,1, 0,0, 0,1]: <e0,e2> = 1, |e0|^2 = 6, |e2|^2 = 3
    assert float(cos[0, 2]) == pytest.approx(1 / 18**0.5)
    assert float(cos[2, 2]) == pytest.approx(1.0)
    assert cos[0, 3] == 0.0 and cos[3, 3] == 0.0  # no NaN next to an all-zero expert


def test_lowest_saliency_experts_join_their_most_similar_kept_expert() -> None:
    saliency = torch.tensor([5.0, 1.0, 4.0, 0.5, 3.0])
    sim = torch.eye(5)
    sim[1, 4] = sim[4, 1] = 0.9
    sim[1, 0] = 0.8
    sim[3, 0] = sim[3, 2] = 0.2  # tie between kept 0 and 2: the lower index
    assert merge_groups(saliency, sim, 2) == {0: [0, 3], 2: [2], 4: [4, 1]}
    # expert 1's most similar expert overall is 3, but 3 is merged away too: 4 takes it
    sim[1, 3] = 0.99
    assert merge_groups(saliency, sim, 2)[4] == [4, 1]
    assert merge_groups(saliency, sim, 4) == {0: [0, 1, 2, 3, 4]}
    # a removed expert whose best kept match is not above the threshold joins no group
    assert merge_groups(saliency, sim, 2, min_similarity=0.5) == {0: [0], 2: [2], 4: [4, 1]}
    assert merge_groups(saliency, sim, 2, min_similarity=0.0) == {0: [0, 3], 2: [2], 4: [4, 1]}
    with pytest.raises(ValueError, match="similarity of shape"):
        merge_groups(saliency, torch.eye(4), 1)


def test_group_shares() -> None:
    freq = torch.tensor([6.0, 0.0, 2.0, 0.0])
    torch.testing.assert_close(group_weights(freq, [0, 2]), torch.tensor([0.75, 0.25]).double())
    torch.testing.assert_close(group_weights(freq, [0, 1]), torch.tensor([1.0, 0.0]).double())
    torch.testing.assert_close(group_weights(freq, [1, 3]), torch.tensor([0.5, 0.5]).double())
    with pytest.raises(ValueError, match=">= 0"):
        group_weights(torch.tensor([1.0, -1.0]), [0, 1])


def test_weighted_average_and_merged_parameters_with_biases() -> None:
    a, b = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 6.0])
    torch.testing.assert_close(weighted_average([a, b], torch.tensor([0.75, 0.25])), a * 1.5)
    with pytest.raises(ValueError, match="different shapes"):
        weighted_average([a, torch.zeros(3)], torch.tensor([0.5, 0.5]))
    torch.manual_seed(0)
    x, y = (
        nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 3)),
        nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 3)),
    )
    merged = merged_parameters([x, y], torch.tensor([0.25, 0.75]).double())
    assert sorted(merged) == ["0.bias", "0.weight", "1.bias", "1.weight"]
    for name, value in merged.items():
        want = 0.25 * dict(x.named_parameters())[name] + 0.75 * dict(y.named_parameters())[name]
        torch.testing.assert_close(value, want.detach())
    with pytest.raises(ValueError, match="different parameters"):
        merged_parameters([x, nn.Sequential(nn.Linear(3, 2))], torch.tensor([0.5, 0.5]))


def test_quantized_or_masked_experts_are_not_merged() -> None:
    check_mergeable(nn.Sequential(nn.Linear(2, 2), nn.SiLU()))
    with_buffer = nn.Sequential(nn.Linear(2, 2))
    with_buffer[0].register_buffer("codes", torch.zeros(2, dtype=torch.uint8))
    with pytest.raises(ValueError, match="merge experts before quantizing"):
        check_mergeable(with_buffer)
    from torch.nn.utils import parametrize

    class Mask(nn.Module):
        def forward(self, w: torch.Tensor) -> torch.Tensor:
            return w * 0

    masked = nn.Sequential(nn.Linear(2, 2))
    parametrize.register_parametrization(masked[0], "weight", Mask())
    with pytest.raises(ValueError, match="not plain float Linears"):
        check_mergeable(masked)


def test_experts_with_compressed_weights_are_not_merged() -> None:
    from slimtorch.formats.state import WeightState, set_state

    expert = nn.Sequential(nn.Linear(2, 2))
    set_state(expert[0], "weight", WeightState(mask=torch.ones(2, 2, dtype=torch.bool)))
    with pytest.raises(ValueError, match=r"weights \['0.weight'\] are compressed"):
        check_mergeable(expert)
