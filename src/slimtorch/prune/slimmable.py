"""Slimmable fine-tuning: one set of weights that works at every width of a reordered model
(the recipe stage ``train.slimmable`` is in :mod:`slimtorch.prune.stages.slimmable`).

After ``prune.reorder`` the first k channels of every group form a sub-network, but that
sub-network was never trained alone: served at 50% width it is close to chance. ``train.slimmable``
trains the full model and its narrowed sub-networks together (Yu et al., "Slimmable Neural
Networks", 2019): every step sums the task loss of each width in ``widths``, and every
narrowed sub-network reads its weights *from the full model's tensors*, so one optimizer updates
one set of shared weights.

Weight sharing without surgery per step: the narrowed model is built once per width by
:func:`slimtorch.artifact.widths.narrow` on a probe whose parameters hold their own flat
positions (``arange``), which gives, for every parameter of the narrowed model, the positions of
the full parameter it keeps - gate blocks of LSTMs, heads and flattened channel blocks included.
A training step then runs the narrowed model with ``torch.func.functional_call`` on the gathered
full tensors, and gradients flow back into the full model.

BatchNorm statistics differ between widths (fewer input channels, different sums): each trained
width keeps its own running mean and variance (switchable BatchNorm), recorded in the model's
info as ``width_stats`` (:class:`~slimtorch.core.info.ModelInfo`); ``slimtorch.load(dir,
width=w)`` uses them for a trained ``w``.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from slimtorch.artifact.widths import narrow, width_key
from slimtorch.calibrate.train import TrainOptions, train
from slimtorch.core.context import Context
from slimtorch.core.errors import UnsupportedModelError
from slimtorch.core.info import update_info
from slimtorch.core.methods import Task

_STATS = ("running_mean", "running_var")


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
        update_info(model, width_stats=stats)
    return losses
