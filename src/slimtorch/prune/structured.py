"""Structured pruning: remove whole channels, attention heads and hidden units, for real.

graph (which dims are coupled) -> importance per group -> how many channels each group keeps
(a ratio per group, one global ranking, or a FLOPs target) -> per-layer surgery. The result is a
smaller dense model: ``slimtorch.save`` records the new shapes and ``slimtorch.load`` rebuilds
them without pickle.
"""

from __future__ import annotations

import copy
import logging
import math
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

import slimtorch.runtime  # noqa: F401  (registers the nn.MultiheadAttention head handler)
from slimtorch.artifact.load import get_metadata
from slimtorch.calibrate.inputs import (
    accumulate_gradients,
    count_flops,
    mean_abs_outputs,
    require_inputs,
    task_loss,
)
from slimtorch.calibrate.train import TrainOptions, train
from slimtorch.core.config import StageConfig
from slimtorch.core.errors import ConfigError, TargetError, UnsupportedModelError
from slimtorch.core.methods import Run, register_method
from slimtorch.core.targets import Targets
from slimtorch.formats.state import iter_states
from slimtorch.graph.dependency import DependencyGraph, Group, build_graph
from slimtorch.graph.handlers import handler_for
from slimtorch.graph.surgery import apply_channels
from slimtorch.prune.importance import group_scores

log = logging.getLogger(__name__)

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


def _scores(
    model: nn.Module, groups: list[Group], config: StructuredConfig, run: Run
) -> dict[int, torch.Tensor]:
    activations = None
    if config.importance == "taylor":
        task = run.require_task("prune.structured (importance: taylor)")
        accumulate_gradients(model, task, run.ctx, config.calibration_batches)
    elif config.importance == "activation":
        task = run.require_task("prune.structured (importance: activation)")
        producers = sorted(
            {
                m.module
                for g in groups
                for m in g.members
                if m.dim == "out" and not _coupled(model, m.module)
            }
        )
        activations = mean_abs_outputs(model, producers, task, run.ctx, config.calibration_batches)
    scores = {
        g.id: group_scores(model, g, config.importance, activations, run.ctx.seed) for g in groups
    }
    if config.importance == "taylor":
        model.zero_grad(set_to_none=True)
    return scores


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


def _scan(
    model: nn.Module,
    graph: DependencyGraph,
    groups: list[Group],
    scores: dict[int, torch.Tensor],
    ratio: float,
    config: StructuredConfig,
    run: Run,
) -> dict[int, float]:
    task = run.require_task("prune.structured (scope: sensitivity)")
    batches = config.calibration_batches
    base = task_loss(model, task, run.ctx, batches)
    losses = {}
    for g in groups:
        trial = copy.deepcopy(model)
        keep = top_channels(scores[g.id], keep_count(g.size, ratio, g.blocks), g.blocks)
        apply_channels(trial, graph, {g.id: keep})
        losses[g.id] = task_loss(trial, task, run.ctx, batches)
    weights = sensitivity_weights({g.id: g.size for g in groups}, losses, base)
    log.info(
        "prune.structured sensitivity: %s",
        ", ".join(f"{g.members[0].module}: {weights[g.id]:.2f}" for g in groups),
    )
    return weights


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


def _check_runs(model: nn.Module, inputs: tuple[Any, ...]) -> None:
    """The pruned model must still run on the example inputs (a forward with sizes written
    into it, e.g. ``x.reshape(-1, 256)``, does not)."""
    try:
        with torch.no_grad():
            model.eval()(*inputs)
    except RuntimeError as exc:
        raise UnsupportedModelError(
            f"after structured pruning the model's forward fails ({str(exc).splitlines()[0]}):"
            " it probably has a size written into a reshape/view; compute sizes from the tensor"
            " (e.g. x.flatten(1)) or put the layers around it in `ignore`"
        ) from exc


def _refuse_states(model: nn.Module) -> None:
    for mname, _, param, _state in iter_states(model):
        raise ConfigError(
            f"{mname}.{param} is already pruned or quantized: put prune.structured before"
            " unstructured pruning, weight sharing and quantization stages in the recipe"
        )


@register_method(
    "prune.structured", StructuredConfig, "remove channels, heads and hidden units for real"
)
def prune_structured(model: nn.Module, config: StructuredConfig, run: Run) -> None:
    _refuse_states(model)
    inputs = require_inputs(model, "prune.structured")
    flops0 = count_flops(model, inputs)
    params0 = sum(p.numel() for p in model.parameters())
    for step in range(config.steps):
        graph = build_graph(model, inputs)
        groups = selected_groups(model, graph, config)
        if not groups:
            frozen = "; ".join(f"{g.describe()}: {g.frozen}" for g in graph.frozen[:4])
            raise TargetError(
                f"no prunable channel group matched targets {config.targets} (ignore"
                f" {config.ignore}); frozen groups: {frozen or 'none'}. Check `targets`/`ignore`"
            )
        scores = _scores(model, groups, config, run)
        weights = None
        if config.scope == "sensitivity":
            probe = config.ratio if config.ratio is not None else 1 - (config.flops or 0.5) ** 0.5
            weights = _scan(model, graph, groups, scores, probe, config, run)
        if config.ratio is not None:
            ratio = 1 - (1 - config.ratio) ** (1 / config.steps)
        else:
            assert config.flops is not None
            target = (
                config.flops ** ((step + 1) / config.steps) * flops0 / count_flops(model, inputs)
            )
            ratio = _ratio_for_flops(model, graph, groups, scores, target, config, inputs, weights)
        keep = plan(groups, scores, ratio, config, weights)
        if config.flops is not None:
            keep = fill_to_flops(model, graph, groups, scores, keep, target, config, inputs)
        changed = apply_channels(model, graph, keep)
        _check_runs(model, inputs)
        log.info(
            "prune.structured step %d: ratio %.3f, %d layers changed", step + 1, ratio, len(changed)
        )
        if config.finetune_steps and run.task is not None:
            options = config.train.model_copy(update={"steps": config.finetune_steps})
            train(model, run.task, run.ctx, options)
    flops1 = count_flops(model, inputs)
    params1 = sum(p.numel() for p in model.parameters())
    get_metadata(model)["structured"] = {
        "flops_before": flops0,
        "flops_after": flops1,
        "params_before": params0,
        "params_after": params1,
    }
    log.info(
        "prune.structured: FLOPs %.3g -> %.3g (%.1f%%), params %d -> %d",
        flops0,
        flops1,
        100 * flops1 / max(flops0, 1),
        params0,
        params1,
    )
