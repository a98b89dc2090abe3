"""Structured pruning: remove whole channels, attention heads and hidden units, for real (the
maths of ``prune.structured``, whose recipe stage is in :mod:`slimtorch.prune.stages.structured`).

graph (which dims are coupled) -> importance per group -> how many channels each group keeps
(a ratio per group, one global ranking, or a FLOPs target) -> per-layer surgery. The result is a
smaller dense model: ``slimtorch.save`` records the new shapes and ``slimtorch.load`` rebuilds
them without pickle.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

import slimtorch.runtime  # noqa: F401  (registers the nn.MultiheadAttention head handler)
from slimtorch.calibrate.inputs import count_flops
from slimtorch.calibrate.train import TrainOptions
from slimtorch.core.config import StageConfig
from slimtorch.core.targets import Targets
from slimtorch.graph.dependency import DependencyGraph, Group
from slimtorch.graph.handlers import handler_for
from slimtorch.graph.surgery import apply_channels

Criterion = Literal["l1", "l2", "taylor", "fpgm", "bn_scale", "activation", "random"]


class StructuredConfig(StageConfig):
    """Remove a fraction of the channels of every prunable group, or reach a FLOPs target.

    ``scope``: ``layer`` removes the same fraction from every group; ``global`` ranks all
    channels together (scores normalised per group); ``sensitivity`` scans each group alone on
    calibration data (--data) and gives sensitive groups lower ratios, the same total.
    """

    ratio: float | None = Field(default=None, ge=0, lt=1, description="channels removed")
    flops: float | None = Field(default=None, gt=0, lt=1, description="fraction of FLOPs kept")
    importance: Criterion = "l1"
    scope: Literal["layer", "global", "sensitivity"] = "layer"
    max_ratio: float = Field(default=0.9, gt=0, lt=1, description="most removed from one group")
    round_to: int = Field(default=1, ge=1, description="keep a multiple of this many channels")
    heads: bool = Field(default=True, description="also prune attention heads")
    steps: int = Field(default=1, ge=1, description="prune in this many steps")
    finetune_steps: int = Field(default=0, ge=0, description="training steps after each step")
    train: TrainOptions = Field(default_factory=TrainOptions)
    calibration_batches: int = Field(default=8, ge=1, description="for taylor / activation")

    @model_validator(mode="after")
    def _one_target(self) -> StructuredConfig:
        if (self.ratio is None) == (self.flops is None):
            raise ValueError(
                "set exactly one of `ratio` (fraction of channels removed per group, e.g. 0.5)"
                " or `flops` (fraction of FLOPs kept, e.g. 0.5)"
            )
        return self


def keep_count(
    size: int, ratio: float, blocks: int = 1, round_to: int = 1, down: bool = False
) -> int:
    """Channels a group of ``size`` keeps after removing ``ratio`` of them, to the nearest whole
    step (``down``: rounded down, so at least ``ratio`` is removed; never none)."""
    step = math.lcm(blocks, round_to)
    keep = size * (1.0 - ratio) / step
    keep = max(step, (math.floor(keep + 1e-9) if down else round(keep)) * step)
    return min(size, keep) if size % step == 0 else size


def top_channels(scores: torch.Tensor, keep: int, blocks: int = 1) -> torch.Tensor:
    """The ``keep`` highest-scoring channels (equal counts per block), ascending."""
    size = scores.numel()
    per = size // blocks
    chosen = []
    for b in range(blocks):
        part = scores[b * per : (b + 1) * per]
        top = torch.topk(part, keep // blocks, sorted=False).indices + b * per
        chosen.append(top)
    return torch.sort(torch.cat(chosen)).values


def normalised(groups: list[Group], scores: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
    """Scores divided by their group's mean, so that channels of different groups compare."""
    return {g.id: scores[g.id] / scores[g.id].mean().clamp_min(1e-12) for g in groups}


def plan(
    groups: list[Group],
    scores: dict[int, torch.Tensor],
    ratio: float,
    config: StructuredConfig,
    weights: dict[int, float] | None = None,
) -> dict[int, torch.Tensor]:
    """Kept channels of every group for ``ratio`` (per group scaled by ``weights``, or one
    global ranking)."""
    counts: dict[int, int] = {}
    if config.scope != "global":
        counts = {
            g.id: keep_count(
                g.size,
                min(config.max_ratio, ratio * (weights or {}).get(g.id, 1.0)),
                g.blocks,
                config.round_to,
                down=config.flops is not None,  # fill_to_flops then rounds up where it fits
            )
            for g in groups
        }
    else:
        normed = normalised(groups, scores)
        flat = torch.cat([normed[g.id] for g in groups])
        cut = int(flat.numel() * ratio)
        threshold = torch.kthvalue(flat, cut).values if cut > 0 else flat.min() - 1
        for g in groups:
            alive = int((normed[g.id] > threshold).sum())
            floor_ = g.size * (1 - config.max_ratio)
            counts[g.id] = keep_count(
                g.size, 1 - max(alive, floor_) / g.size, g.blocks, config.round_to
            )
    return {g.id: top_channels(scores[g.id], counts[g.id], g.blocks) for g in groups}


def selected_groups(
    model: nn.Module, graph: DependencyGraph, config: StructuredConfig
) -> list[Group]:
    """Prunable groups produced by a targeted layer (its output channels, or its heads) and by
    no ignored layer: ``ignore`` keeps a layer's outputs, as Torch-Pruning's ignored layers."""
    sel = Targets.of(config.targets, config.ignore)
    out = []
    for g in graph.prunable:
        mods = [(m, model.get_submodule(m.module)) for m in g.members]
        internal = any(m.dim not in ("in", "out") for m in g.members)
        if internal and not config.heads:
            continue
        producers = [(m, mod) for m, mod in mods if m.dim != "in" and not _coupled(model, m.module)]
        if any(any(sel.matches(p, m.module, mod) for p in config.ignore) for m, mod in producers):
            continue  # an ignored layer keeps its outputs (its inputs may still shrink)
        if any(sel.selects(m.module, mod) for m, mod in producers):
            out.append(g)
    return out


def _coupled(model: nn.Module, name: str) -> bool:
    module = model.get_submodule(name)
    handler = handler_for(module)
    return bool(handler and handler.coupled(module))


def sensitivity_weights(
    sizes: dict[int, int], losses: dict[int, float], base: float
) -> dict[int, float]:
    """Per-group ratio multipliers from a sensitivity scan: inversely proportional to the loss
    increase each group causes alone, clamped to [0.25, 2], channel-weighted mean 1."""
    eps = 1e-3 * abs(base) + 1e-6
    inv = {g: 1.0 / (max(losses[g] - base, 0.0) + eps) for g in losses}
    scale = sum(sizes.values()) / sum(sizes[g] * inv[g] for g in inv)
    return {g: min(2.0, max(0.25, inv[g] * scale)) for g in inv}


def _ratio_for_flops(
    model: nn.Module,
    graph: DependencyGraph,
    groups: list[Group],
    scores: dict[int, torch.Tensor],
    target: float,
    config: StructuredConfig,
    inputs: tuple[Any, ...],
    weights: dict[int, float] | None = None,
) -> float:
    """Bisection on the ratio so that the pruned model keeps ``target`` of its FLOPs."""
    base = count_flops(model, inputs)
    lo, hi = 0.0, config.max_ratio
    for _ in range(12):
        mid = (lo + hi) / 2
        trial = copy.deepcopy(model)
        apply_channels(trial, graph, plan(groups, scores, mid, config, weights))
        if count_flops(trial, inputs) / base > target:
            lo = mid
        else:
            hi = mid
    return hi


def fill_to_flops(
    model: nn.Module,
    graph: DependencyGraph,
    groups: list[Group],
    scores: dict[int, torch.Tensor],
    keep: dict[int, torch.Tensor],
    target: float,
    config: StructuredConfig,
    inputs: tuple[Any, ...],
) -> dict[int, torch.Tensor]:
    """Spend what rounding left of the FLOPs budget: give each group back at most the one step
    of channels that rounding down took from it (its most important removed ones), the most
    importance (scores normalised per group) per FLOP first, while the model stays within
    ``target`` of its FLOPs.

    One ratio for every group cannot reach every budget (8 channels keep 5 or 6, 64 keep 44
    or 47): the bisection stops at the first ratio under the target, often well under it, and
    the model ends smaller and less accurate than the budget allows. The FLOPs a step costs are
    measured once per group; every step taken is checked with a full count."""
    base = count_flops(model, inputs)
    normed = normalised(groups, scores)

    def flops(plan_: dict[int, torch.Tensor]) -> int:
        trial = copy.deepcopy(model)
        apply_channels(trial, graph, plan_)
        return count_flops(trial, inputs)

    now = flops(keep)
    candidates = []  # (importance gained per FLOP, group id, its channels one step up)
    for g in groups:
        n = int(keep[g.id].numel()) + math.lcm(g.blocks, config.round_to)
        if n > g.size:
            continue
        bigger = top_channels(scores[g.id], n, g.blocks)
        gain = float(normed[g.id][bigger].sum() - normed[g.id][keep[g.id]].sum())
        candidates.append((gain / max(flops({**keep, g.id: bigger}) - now, 1), g.id, bigger))
    for _, gid, bigger in sorted(candidates, key=lambda c: c[0], reverse=True):
        if flops({**keep, gid: bigger}) <= target * base:
            keep = {**keep, gid: bigger}
    return keep
