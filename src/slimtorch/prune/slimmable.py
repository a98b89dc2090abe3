"""Slimmable fine-tuning: one set of weights that works at every width of a reordered model.

After ``prune.reorder`` the first k channels of every group form a sub-network, but that
sub-network was never trained alone: served at 50% width it is close to chance. ``train.slimmable``
trains the full model and its narrowed sub-networks together (Yu et al., "Slimmable Neural
Networks", 2019): every step sums the task loss of each width in ``widths``, and every
narrowed sub-network reads its weights *from the full model's tensors*, so one optimizer updates
one set of shared weights.

Weight sharing without surgery per step: the narrowed model is built once per width by
:func:`slimtorch.artifact.load.narrow` on a probe whose parameters hold their own flat
positions (``arange``), which gives, for every parameter of the narrowed model, the positions of
the full parameter it keeps - gate blocks of LSTMs, heads and flattened channel blocks included.
A training step then runs the narrowed model with ``torch.func.functional_call`` on the gathered
full tensors, and gradients flow back into the full model.

BatchNorm statistics differ between widths (fewer input channels, different sums): each trained
width keeps its own running mean and variance (switchable BatchNorm), recorded in the model's
metadata under :data:`~slimtorch.artifact.load.WIDTH_STATS_KEY`; ``slimtorch.load(dir,
width=w)`` uses them for a trained ``w``.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
from pydantic import Field, field_validator
from torch import nn

from slimtorch.artifact.load import (
    WIDTH_STATS_KEY,
    available_widths,
    get_metadata,
    narrow,
    width_key,
)
from slimtorch.calibrate.train import TrainOptions, train
from slimtorch.core.config import StageConfig
from slimtorch.core.context import Context
from slimtorch.core.errors import ConfigError, UnsupportedModelError
from slimtorch.core.methods import Run, Task, register_method

log = logging.getLogger(__name__)

_STATS = ("running_mean", "running_var")


class SlimmableConfig(StageConfig):
    """Train every width of a ``prune.reorder``-ed model at once (needs --data)."""

    widths: list[float] = Field(
        default_factory=lambda: [1.0, 0.75, 0.5],
        description="the widths trained together; 1.0 (the full model) is always included",
    )
    train: TrainOptions = Field(default_factory=TrainOptions)

    @field_validator("widths")
    @classmethod
    def _in_range(cls, widths: list[float]) -> list[float]:
        bad = [w for w in widths if not 0 < w <= 1]
        if bad or not widths:
            raise ValueError(f"widths must be fractions in (0, 1], got {widths}")
        return sorted({1.0, *widths}, reverse=True)


def position_maps(model: nn.Module, width: float) -> dict[str, torch.Tensor]:
    """For each parameter of ``narrow(model, width)``: the flat positions in the full model's
    parameter of the same name that it keeps."""
    probe = copy.deepcopy(model)
    with torch.no_grad():
        for p in probe.parameters():
            p.data = torch.arange(p.numel(), dtype=torch.float64).reshape(p.shape)
    small = narrow(probe, width)
    full = dict(model.named_parameters())
    maps = {}
    for name, p in small.named_parameters():
        if name not in full:
            raise UnsupportedModelError(
                f"train.slimmable: the narrowed model's parameter {name!r} has no counterpart in"
                " the full model (a module was replaced); train each width with train.finetune"
            )
        maps[name] = p.detach().round().long()
    return maps


class SharedWidth(nn.Module):
    """``narrow(model, width)`` computing with the full model's (gathered) parameters."""

    def __init__(self, full: nn.Module, width: float) -> None:
        super().__init__()
        self.width = width
        self.maps = position_maps(full, width)
        self.small = narrow(full, width)
        self._full = [full]  # not a submodule: its parameters are not this module's

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        full = dict(self._full[0].named_parameters())
        params = {n: full[n].reshape(-1)[idx] for n, idx in self.maps.items()}
        return torch.func.functional_call(self.small, params, args, kwargs, strict=False)

    def statistics(self) -> dict[str, list[float]]:
        """This width's BatchNorm running statistics, by buffer name."""
        return {
            n: b.detach().float().tolist()
            for n, b in self.small.named_buffers()
            if n.rpartition(".")[2] in _STATS
        }


class SlimmableTask:
    """The task whose loss on a batch is the sum of the losses of every width."""

    def __init__(self, base: Task, views: list[SharedWidth]) -> None:
        self.base = base
        self.views = views
        self.name = f"slimmable({base.name})"

    def train_batches(self, ctx: Context, steps: int, batch_size: int) -> Any:
        return self.base.train_batches(ctx, steps, batch_size)

    def loss(self, model: nn.Module, batch: Any) -> Any:
        total = self.base.loss(model, batch)
        for view in self.views:
            view.small.train(model.training)
            total = total + self.base.loss(view, batch)
        return total

    def forward(self, model: nn.Module, batch: Any) -> Any:
        return self.base.forward(model, batch)


def train_slimmable(
    model: nn.Module, task: Task, ctx: Context, options: TrainOptions, widths: list[float]
) -> list[float]:
    """Train ``model`` (prune.reorder-ed) at every width in ``widths`` at once; records the
    BatchNorm statistics of each narrower width in the model's metadata."""
    views = [SharedWidth(model, w) for w in widths if w < 1]
    losses = train(model, SlimmableTask(task, views), ctx, options)
    stats = {width_key(v.width): v.statistics() for v in views}
    if any(stats.values()):
        get_metadata(model)[WIDTH_STATS_KEY] = stats
    return losses


def _check_reordered(model: nn.Module) -> None:
    if not available_widths(model):
        raise ConfigError(
            "train.slimmable trains the widths of a prune.reorder-ed model: put a"
            " `prune.reorder` stage before it (see examples/recipes/multiwidth.yaml)"
        )


@register_method(
    "train.slimmable",
    SlimmableConfig,
    "train every width of a prune.reorder-ed model together (one artifact, several widths)",
    needs_data=True,
)
def slimmable(model: nn.Module, config: SlimmableConfig, run: Run) -> None:
    _check_reordered(model)
    task = run.require_task("train.slimmable")
    losses = train_slimmable(model, task, run.ctx, config.train, config.widths)
    log.info("slimmable training at widths %s: loss %.4f -> %.4f", config.widths, losses[0],
             losses[-1])  # fmt: skip
