"""The one training loop that fine-tuning stages share, with a small callback API.

    trainer callbacks see the model at: on_train_begin, on_step_begin(step),
    on_after_backward(step), on_step_end(step), on_train_end

:class:`KeepMasks` (always on) keeps pruned weights at exactly zero: their gradients are zeroed
after backward and the mask is re-applied after every optimizer step. Weights that already carry
a quantization grid are frozen (re-quantize or use ``quantize.qat`` to train them).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence

import torch
from pydantic import Field
from torch import nn

from slimtorch.core.config import StrictModel
from slimtorch.core.context import Context
from slimtorch.core.errors import ConfigError
from slimtorch.core.methods import Task
from slimtorch.formats.state import iter_states


class TrainOptions(StrictModel):
    """Optimizer settings shared by every stage that trains."""

    steps: int = Field(default=300, ge=1, description="optimizer steps")
    lr: float = Field(default=1e-3, gt=0)
    batch_size: int = Field(default=64, ge=1)
    optimizer: str = Field(default="adam", pattern="^(adam|sgd)$")
    weight_decay: float = Field(default=0.0, ge=0)
    lr_schedule: str = Field(default="cosine", pattern="^(constant|cosine)$")


class TrainingCallback:
    """Hooks into :func:`train`; subclass and override what you need."""

    def on_train_begin(self, model: nn.Module) -> None:
        """Called once before the first step."""

    def on_step_begin(self, model: nn.Module, step: int) -> None:
        """Called before the forward pass of ``step``."""

    def on_after_backward(self, model: nn.Module, step: int) -> None:
        """Called after ``loss.backward()``, before the optimizer step."""

    def on_step_end(self, model: nn.Module, step: int) -> None:
        """Called after the optimizer step."""

    def on_train_end(self, model: nn.Module) -> None:
        """Called once after the last step."""


class KeepMasks(TrainingCallback):
    """Keeps every masked weight at exactly zero where its mask is False."""

    def _masked(self, model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
        out = []
        for _, module, param, state in iter_states(model):
            if state.mask is not None:
                out.append((getattr(module, param), state.mask))
        return out

    def on_after_backward(self, model: nn.Module, step: int) -> None:
        for p, mask in self._masked(model):
            if p.grad is not None:
                p.grad.mul_(mask.to(p.grad.dtype))

    def on_step_end(self, model: nn.Module, step: int) -> None:
        with torch.no_grad():
            for p, mask in self._masked(model):
                p.mul_(mask.to(p.dtype))


def _frozen_quantized(model: nn.Module) -> list[nn.Parameter]:
    frozen = []
    for _, module, param, state in iter_states(model):
        p = getattr(module, param)
        if state.quant is not None and p.requires_grad:
            p.requires_grad_(False)
            frozen.append(p)
    return frozen


@contextlib.contextmanager
def seeded_rng(ctx: Context) -> Iterator[None]:
    """Torch's global RNG seeded with ``ctx.seed`` (dropout, a DataLoader's shuffle) inside the
    block, and the caller's RNG state back unchanged after it. Only the CPU generator and, when
    ``ctx.device`` is CUDA, that device's are forked and seeded; no other device is touched."""
    device = torch.device(ctx.device)
    cuda: list[int] = []
    if device.type == "cuda":
        cuda = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=cuda):
        torch.default_generator.manual_seed(ctx.seed)
        for index in cuda:
            with torch.cuda.device(index):
                torch.cuda.manual_seed(ctx.seed)
        yield


def train(
    model: nn.Module,
    task: Task,
    ctx: Context,
    options: TrainOptions,
    callbacks: Sequence[TrainingCallback] = (),
) -> list[float]:
    """Train ``model`` on ``task`` for ``options.steps`` steps; returns the loss per step."""
    cbs: list[TrainingCallback] = [*callbacks, KeepMasks()]
    frozen = _frozen_quantized(model)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("nothing to train: every parameter is frozen or quantized")
    opt: torch.optim.Optimizer
    if options.optimizer == "adam":
        opt = torch.optim.Adam(params, lr=options.lr, weight_decay=options.weight_decay)
    else:
        opt = torch.optim.SGD(
            params, lr=options.lr, momentum=0.9, weight_decay=options.weight_decay
        )
    sched: torch.optim.lr_scheduler.LRScheduler | None = None
    if options.lr_schedule == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=options.steps)
    with seeded_rng(ctx):  # the run's own stream; the caller's global RNG is left as it was
        return _steps(model, task, ctx, options, opt, sched, cbs, frozen)


def _steps(
    model: nn.Module,
    task: Task,
    ctx: Context,
    options: TrainOptions,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler | None,
    cbs: list[TrainingCallback],
    frozen: list[nn.Parameter],
) -> list[float]:
    was_training = model.training
    model.train()
    losses: list[float] = []
    for cb in cbs:
        cb.on_train_begin(model)
    batches = task.train_batches(ctx, options.steps, options.batch_size)
    try:
        for step, batch in enumerate(ctx.progress_bar(batches, "fine-tune", options.steps)):
            for cb in cbs:
                cb.on_step_begin(model, step)
            opt.zero_grad(set_to_none=True)
            loss = task.loss(model, batch)
            value = loss.detach().item()
            if not math.isfinite(value):
                raise ConfigError(f"training diverged at step {step} (loss {value}); lower `lr`")
            loss.backward()
            for cb in cbs:
                cb.on_after_backward(model, step)
            opt.step()
            if sched is not None:
                sched.step()
            for cb in cbs:
                cb.on_step_end(model, step)
            losses.append(value)
    finally:
        for p in frozen:
            p.requires_grad_(True)
        model.train(was_training)
    for cb in cbs:
        cb.on_train_end(model)
    return losses
