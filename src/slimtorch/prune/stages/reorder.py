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
from typing import Any, Literal

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
from slimtorch.prune.criteria import magnitude_mask
from slimtorch.prune.genetic import (
    GeneticOptions,
    density_order,
    genetic_permutation,
    genetic_search,
    index_fitness,
    nm_fitness,
    swap_climb,
)
from slimtorch.prune.importance import group_scores
from slimtorch.prune.permutation import find_permutation
from slimtorch.prune.reorder import consumer_blocks, consumer_matrix, importance_order
from slimtorch.prune.structured import Criterion, StructuredConfig, selected_groups

log = logging.getLogger(__name__)


class PermuteConfig(StageConfig):
    """Permute channels so that N:M pruning (``prune.nm`` next) keeps more magnitude, or
    (``objective: index``) so that the positions of a later ``prune.magnitude`` at ``sparsity``
    compress best; ``search: genetic`` runs the genetic search of :mod:`slimtorch.prune.genetic`
    (``population`` x ``generations``) instead of the greedy one."""

    n: int = Field(default=2, ge=1)
    m: int = Field(default=4, ge=2)
    max_iters: int = Field(default=10_000, ge=1, description="swap rounds per group")
    seed: int = 0
    search: Literal["greedy", "genetic"] = "greedy"
    objective: Literal["nm", "index"] = Field(
        default="nm",
        description="nm: |w| kept by n:m pruning; index: bits of the sparse index of per-layer"
        " magnitude pruning at `sparsity` (greedy = density order + as many random swaps as"
        " the genetic search evaluates)",
    )
    sparsity: float = Field(default=0.9, gt=0, lt=1, description="objective index only")
    population: int = Field(default=32, ge=4, description="genetic search only")
    generations: int = Field(default=200, ge=1, description="genetic search only")
    time_budget: float | None = Field(
        default=None, gt=0, description="genetic search: seconds per group (machine-dependent)"
    )

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
        found = _inputs(model, group, config)
        if not found or group.blocks > 1 or (config.objective == "nm" and group.size % config.m):
            continue
        perm, old, new = _search(found, config)
        before += old
        after += new
        if new > old:
            perms[group.id] = perm
    apply_channels(model, graph, perms)
    what = f"|w| kept under {config.n}:{config.m}" if config.objective == "nm" else "-index bits"
    log.info(
        "prune.permute (%s): %d groups reordered; %s %.4g -> %.4g (%+.2f%%)",
        config.search, len(perms), what, before, after,
        100 * (after / before - 1) if before else 0.0,
    )  # fmt: skip


def _inputs(model: nn.Module, group: Group, config: PermuteConfig) -> list[torch.Tensor]:
    """The consumers' columns (``nm``) or magnitude masks in memory order (``index``)."""
    if config.objective == "nm":
        mats = [consumer_matrix(model, mem, config.m) for mem in group.members]
        return [x for x in mats if x is not None]
    blocks = [consumer_blocks(model, mem) for mem in group.members]
    return [magnitude_mask(x, config.sparsity) for x in blocks if x is not None]


def _search(found: list[torch.Tensor], config: PermuteConfig) -> tuple[torch.Tensor, float, float]:
    """``(perm, fitness of the identity, fitness of perm)`` for one group."""
    if config.objective == "nm" and config.search == "greedy":
        result = find_permutation(
            found, config.n, config.m, max_iters=config.max_iters, seed=config.seed
        )
        return result.perm, result.identity_kept, result.kept
    options = GeneticOptions(
        config.population, config.generations, time_budget=config.time_budget, seed=config.seed
    )
    c = int(found[0].shape[1])
    if config.objective == "nm":
        fitness = nm_fitness(found, config.n, config.m)
        found_ga = genetic_permutation(found, config.n, config.m, options)
    else:
        fitness = index_fitness(found)
        starts = [torch.arange(c), density_order(found)]
        if config.search == "genetic":
            found_ga = genetic_search(fitness, starts, options)
        else:
            budget = options.population + options.generations * (options.population - options.elite)
            values = fitness(torch.stack(starts))
            found_ga = swap_climb(fitness, starts[int(values.argmax())], budget, config.seed)
    identity = float(fitness(torch.arange(c).unsqueeze(0))[0])
    return found_ga.perm, identity, found_ga.fitness


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
