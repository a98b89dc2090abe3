"""Recipe stages that reorder channels: they change no output but help later stages.

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
from slimtorch.calibrate.inputs import require_inputs
from slimtorch.core.config import StageConfig
from slimtorch.core.errors import TargetError
from slimtorch.core.info import update_info
from slimtorch.core.methods import Run, register_method
from slimtorch.graph.dependency import Group, build_graph
from slimtorch.graph.surgery import apply_channels
from slimtorch.prune.importance import group_scores
from slimtorch.prune.permutation import find_permutation
from slimtorch.prune.reorder import consumer_matrix, importance_order
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
    update_info(model, widths=[_record(g) for g in groups])
    log.info("prune.reorder: %d groups ordered by %s importance", len(groups), config.importance)
