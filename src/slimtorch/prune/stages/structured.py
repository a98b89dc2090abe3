"""The recipe stage ``prune.structured``: remove whole channels, attention heads and hidden units
for real, in ``steps`` rounds (each optionally followed by fine-tuning on --data).

Each round: build the dependency graph, score every selected group (:mod:`slimtorch.prune.
importance`; ``taylor`` and ``activation`` on --data), optionally scan each group's sensitivity,
pick how many channels each keeps (a ratio, one global ranking, or a FLOPs target; the maths is
in :mod:`slimtorch.prune.structured`), and cut them out. The model's info records the FLOPs and
parameters before and after.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
from torch import nn

import slimtorch.runtime  # noqa: F401  (registers the nn.MultiheadAttention head handler)
from slimtorch.calibrate.inputs import (
    accumulate_gradients,
    count_flops,
    mean_abs_outputs,
    require_inputs,
    task_loss,
)
from slimtorch.calibrate.train import train
from slimtorch.core.errors import ConfigError, TargetError, UnsupportedModelError
from slimtorch.core.info import update_info
from slimtorch.core.methods import Run, register_method
from slimtorch.formats.state import iter_states
from slimtorch.graph.dependency import DependencyGraph, Group, build_graph
from slimtorch.graph.surgery import apply_channels
from slimtorch.prune.importance import group_scores
from slimtorch.prune.structured import (
    StructuredConfig,
    _coupled,
    _ratio_for_flops,
    fill_to_flops,
    keep_count,
    plan,
    selected_groups,
    sensitivity_weights,
    top_channels,
)

log = logging.getLogger(__name__)


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
    "prune.structured",
    StructuredConfig,
    "remove channels, heads and hidden units for real",
    example={"ratio": 0.5},
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
    update_info(
        model,
        structured={
            "flops_before": flops0,
            "flops_after": flops1,
            "params_before": params0,
            "params_after": params1,
        },
    )
    log.info(
        "prune.structured: FLOPs %.3g -> %.3g (%.1f%%), params %d -> %d",
        flops0,
        flops1,
        100 * flops1 / max(flops0, 1),
        params0,
        params1,
    )
