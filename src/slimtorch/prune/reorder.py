"""Weight reordering: channel permutations that change no output but help later stages.

``prune.permute``: for N:M sparsity, permute each group of coupled channels so that the
consumers' N:M groups keep more magnitude (Pool & Yu, 2021); run it before ``prune.nm``.

``prune.reorder``: order every group's channels by importance, most important first, so that
the first k channels of every group form a sub-network. The artifact records the groups; one
saved model then serves at several widths (the ``width`` argument of slimtorch.load, or
:func:`slimtorch.search.width.choose_width` for a latency or size budget).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from pydantic import Field, model_validator
from torch import nn

import slimtorch.runtime  # noqa: F401  (registers the nn.MultiheadAttention head handler)
from slimtorch.artifact.load import WIDTHS_KEY, get_metadata
from slimtorch.calibrate.inputs import require_inputs
from slimtorch.core.config import StageConfig
from slimtorch.core.errors import TargetError
from slimtorch.core.methods import Run, register_method
from slimtorch.graph.dependency import Group, Member, build_graph
from slimtorch.graph.surgery import apply_channels
from slimtorch.prune.importance import group_scores
from slimtorch.prune.permutation import channel_matrix, find_permutation
from slimtorch.prune.structured import Criterion, StructuredConfig, selected_groups

log = logging.getLogger(__name__)


class PermuteConfig(StageConfig):
    """Permute channels so that N:M pruning (``prune.nm`` next) keeps more magnitude."""

    n: int = Field(default=2, ge=1)
    m: int = Field(default=4, ge=2)
    max_iters: int = Field(default=10_000, ge=1, description="swap rounds per group")
    seed: int = 0

    @model_validator(mode="after")
    def _n_below_m(self) -> PermuteConfig:
        if self.n >= self.m:
            raise ValueError(f"n must be below m for N:M sparsity, got {self.n}:{self.m}")
        return self


def consumer_matrix(model: nn.Module, member: Member, m: int) -> torch.Tensor | None:
    """The columns of a Linear/Conv consumer that read the group's channels, as ``[rows, C]``,
    or None when its N:M groups do not line up with the channels (then it is left out)."""
    module = model.get_submodule(member.module)
    kinds = {c.__name__ for c in type(module).__mro__}
    if member.dim != "in" or not kinds & {"Linear", "Conv1d", "Conv2d", "Conv3d"}:
        return None
    if member.index.shape[1] != 1 or getattr(module, "groups", 1) != 1:
        return None
    cols = member.index[:, 0]
    start = int(cols.min())
    if start % m or not torch.equal(cols, torch.arange(start, start + cols.numel())):
        return None
    weight = module.weight.detach()  # type: ignore[union-attr,operator]
    return channel_matrix(weight)[:, start : start + cols.numel()]


@register_method("prune.permute", PermuteConfig, "reorder channels so N:M pruning keeps more")
def prune_permute(model: nn.Module, config: PermuteConfig, run: Run) -> None:
    inputs = require_inputs(model, "prune.permute")
    graph = build_graph(model, inputs)
    groups = selected_groups(model, graph, StructuredConfig(ratio=0.0, **_targets(config)))
    perms: dict[int, torch.Tensor] = {}
    before = after = 0.0
    for group in groups:
        mats = [consumer_matrix(model, mem, config.m) for mem in group.members]
        found = [x for x in mats if x is not None]
        if not found or group.size % config.m or group.blocks > 1:
            continue
        result = find_permutation(
            found, config.n, config.m, max_iters=config.max_iters, seed=config.seed
        )
        before += result.identity_kept
        after += result.kept
        if result.kept > result.identity_kept:
            perms[group.id] = result.perm
    apply_channels(model, graph, perms)
    log.info(
        "prune.permute: %d groups reordered; |w| kept under %d:%d %.4g -> %.4g (%+.2f%%)",
        len(perms), config.n, config.m, before, after, 100 * (after / max(before, 1e-12) - 1),
    )  # fmt: skip


def _targets(config: StageConfig) -> dict[str, Any]:
    return {"targets": config.targets, "ignore": config.ignore}


class ReorderConfig(StageConfig):
    """Order channels by importance so that one artifact runs at several widths."""

    importance: Criterion = "l1"
    heads: bool = True


def importance_order(scores: torch.Tensor, blocks: int = 1) -> torch.Tensor:
    """Channels by decreasing score, block by block (blocks keep their own channels)."""
    per = scores.numel() // blocks
    parts = [
        torch.argsort(scores[b * per : (b + 1) * per], descending=True, stable=True) + b * per
        for b in range(blocks)
    ]
    return torch.cat(parts)


def _record(group: Group) -> dict[str, Any]:
    return {
        "size": group.size,
        "blocks": group.blocks,
        "members": [[m.module, m.dim, m.index.tolist()] for m in group.members],
    }


@register_method("prune.reorder", ReorderConfig, "order channels by importance (multi-width)")
def prune_reorder(model: nn.Module, config: ReorderConfig, run: Run) -> None:
    inputs = require_inputs(model, "prune.reorder")
    graph = build_graph(model, inputs)
    structured = StructuredConfig(ratio=0.0, heads=config.heads, **_targets(config))
    groups = selected_groups(model, graph, structured)
    if not groups:
        raise TargetError(f"prune.reorder: no prunable channel group matched {config.targets}")
    order = {
        g.id: importance_order(group_scores(model, g, config.importance), g.blocks) for g in groups
    }
    apply_channels(model, graph, order)
    get_metadata(model)[WIDTHS_KEY] = [_record(g) for g in groups]
    log.info("prune.reorder: %d groups ordered by %s importance", len(groups), config.importance)
