"""The dependency graph: groups of coupled channels, frozen spaces, and exact surgery."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from slimtorch.core.errors import ConfigError, UnsupportedModelError
from slimtorch.graph.dependency import DependencyGraph, Group, build_graph
from slimtorch.graph.surgery import apply_channels, dim_order, resized_modules
from slimtorch.testing.models import example_input, tiny_lstm, tiny_resnet, tiny_stack


def _dims(group: Group) -> set[str]:
    return {f"{m.module}.{m.dim}" for m in group.members}


def _find(graph: DependencyGraph, member: str) -> Group:
    return next(g for g in graph.groups if member in _dims(g))


def _block_perm(group: Group, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    per = group.size // group.blocks
    return torch.cat([torch.randperm(per, generator=gen) + b * per for b in range(group.blocks)])


def test_resnet_groups_follow_residuals_concat_and_flatten() -> None:
    model = tiny_resnet()
    graph = build_graph(model, (example_input(model),))
    stem = _find(graph, "stem.out")
    # the residual stream of block1: stem, bn, block1's second conv + bn, both blocks' inputs
    assert {"bn.out", "block1.conv2.out", "block1.bn2.out", "block1.conv1.in"} <= _dims(stem)
    assert {"block2.conv1.in", "block2.shortcut.0.in"} <= _dims(stem)
    out2 = _find(graph, "block2.conv2.out")
    assert {"block2.shortcut.0.out", "depthwise.out", "gn.out", "side.in", "fc.in"} <= _dims(out2)
    assert out2.blocks == 4  # GroupNorm(4, 16)
    fc_in = next(m for m in out2.members if m.module == "fc" and m.dim == "in")
    # flatten after a 2x2 pool: channel c is 4 features; the side branch sits 16 channels later
    assert fc_in.index.shape == (16, 4)
    assert fc_in.index[1].tolist() == [4, 5, 6, 7]
    side = _find(graph, "side.out")
    side_fc = next(m for m in side.members if m.module == "fc")
    assert side_fc.index[0].tolist() == [64, 65, 66, 67]
    assert "reaches the model's output" in (_find(graph, "fc.out").frozen or "")


@pytest.mark.parametrize("factory", [tiny_resnet, tiny_lstm, tiny_stack])
def test_permuting_every_group_leaves_outputs_unchanged(factory: object) -> None:
    model = factory()  # type: ignore[operator]
    x = example_input(model)
    graph = build_graph(model, (x,))
    assert graph.prunable
    pruned = copy.deepcopy(model)
    apply_channels(pruned, graph, {g.id: _block_perm(g, g.id) for g in graph.prunable})
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), model(x), atol=1e-5, rtol=1e-5)


def test_removing_channels_equals_zeroing_them() -> None:
    """Cutting channel c of a producer = zeroing its weights (and BN scale/shift) upstream."""
    model = tiny_resnet()
    x = example_input(model)
    graph = build_graph(model, (x,))
    group = _find(graph, "block1.conv1.out")
    keep = torch.tensor([0, 2, 3, 5, 7])
    pruned = copy.deepcopy(model)
    changed = apply_channels(pruned, graph, {group.id: keep})
    assert set(changed) == {"block1.conv1", "block1.bn1", "block1.conv2"}
    assert pruned.block1.conv1.weight.shape == (5, 8, 3, 3)
    assert pruned.block1.conv2.weight.shape == (8, 5, 3, 3)
    assert resized_modules(pruned) >= set(changed)
    zeroed = copy.deepcopy(model)
    drop = torch.tensor([1, 4, 6])
    with torch.no_grad():
        zeroed.block1.bn1.weight[drop] = 0
        zeroed.block1.bn1.bias[drop] = 0
        torch.testing.assert_close(pruned(x), zeroed(x), atol=1e-5, rtol=1e-5)


def test_lstm_hidden_units_couple_bidirectional_outputs() -> None:
    model = tiny_lstm()
    graph = build_graph(model, (example_input(model),))
    lstm = _find(graph, "lstm.out")
    gru_in = next(m for m in lstm.members if m.module == "gru")
    assert gru_in.index.shape == (16, 2)
    assert gru_in.index[3].tolist() == [3, 19]
    assert "emb.out" in _dims(_find(graph, "lstm.in"))
    pruned = copy.deepcopy(model)
    apply_channels(pruned, graph, {lstm.id: torch.arange(0, 16, 2)})
    assert pruned.lstm.hidden_size == 8 and pruned.gru.input_size == 16
    assert pruned(example_input(model)).shape == (4, 32)


def test_dim_order_fills_slots_block_by_block() -> None:
    from slimtorch.graph.dependency import Member

    tiles = Member("m", "in", torch.tensor([[0, 3], [1, 4], [2, 5]]))  # bidirectional, H = 3
    assert dim_order(6, [(tiles, torch.tensor([2, 0]))]).tolist() == [2, 0, 5, 3]
    inner = Member("m", "in", torch.tensor([[0, 1], [2, 3], [4, 5]]))  # flatten, 2 per channel
    assert dim_order(7, [(inner, torch.tensor([2, 0]))]).tolist() == [4, 5, 0, 1, 6]


def test_bad_keeps_are_refused() -> None:
    model = tiny_resnet()
    graph = build_graph(model, (example_input(model),))
    group = _find(graph, "block2.conv2.out")  # 4 blocks of 4 (GroupNorm)
    with pytest.raises(ConfigError, match="same number of channels"):
        apply_channels(model, graph, {group.id: torch.tensor([0, 1, 4])})
    with pytest.raises(ConfigError, match="unique"):
        apply_channels(model, graph, {group.id: torch.tensor([0, 0, 4, 8])})
    with pytest.raises(ConfigError, match="cannot remove every"):
        apply_channels(model, graph, {group.id: torch.tensor([], dtype=torch.int64)})
    frozen = _find(graph, "fc.out")
    with pytest.raises(ConfigError, match="cannot be pruned"):
        apply_channels(model, graph, {frozen.id: torch.tensor([0])})


class _Splits(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 8)
        self.b = nn.Linear(2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x).reshape(x.shape[0], 4, 2)  # splits the channel axis
        return self.b(h).sum(1)


def test_unfollowable_ops_freeze_with_the_reason() -> None:
    model = _Splits()
    graph = build_graph(model, (torch.randn(2, 4),))
    assert "splits channels" in (_find(graph, "a.out").frozen or "")
    assert not graph.prunable


class _Untraceable(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # data-dependent control flow
            return x
        return -x


def test_tracing_failure_is_a_clear_error() -> None:
    with pytest.raises(UnsupportedModelError, match="register_handler"):
        build_graph(_Untraceable(), (torch.randn(2, 3),))
