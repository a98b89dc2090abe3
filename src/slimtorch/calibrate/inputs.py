"""Example inputs for tracing and timing, FLOPs, and the statistics passes of structured pruning
(gradients for Taylor importance, mean |activation| per channel)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from slimtorch.core.context import Context
from slimtorch.core.errors import ConfigError
from slimtorch.core.info import model_info
from slimtorch.core.methods import Task


def example_inputs(
    model: nn.Module, batch: int = 2, architecture: dict[str, Any] | None = None
) -> tuple[Any, ...] | None:
    """Inputs slimtorch knows for ``model`` (metadata ``input``, builtin, or HF config), or None."""
    info = model_info(model)
    spec = info.input
    gen = torch.Generator().manual_seed(0)
    if spec is not None:
        shape = list(spec.shape)
        if spec.dtype == "int64":
            return (torch.randint(0, 2, shape, generator=gen),)
        return (torch.randn(shape, generator=gen),)
    arch = architecture if architecture is not None else info.architecture or {}
    kind = arch.get("kind")
    if kind == "builtin":
        from slimtorch.models.registry import builtin_info

        return builtin_info(str(arch["name"])).example_inputs(batch)
    if kind == "hf":
        config = arch.get("config", {})
        vocab = int(config.get("vocab_size") or 0)
        length = min(128, int(config.get("max_position_embeddings") or 128))
        if vocab:
            return (torch.randint(0, vocab, (batch, length), generator=gen),)
    return None


def require_inputs(model: nn.Module, method: str, batch: int = 2) -> tuple[Any, ...]:
    inputs = example_inputs(model, batch)
    if inputs is None:
        raise ConfigError(
            f"{method} traces the model and needs example inputs: load it as builtin:NAME or a"
            " Hugging Face directory, or record them with"
            " slimtorch.core.info.update_info(model, input={'shape': [...],"
            " 'dtype': 'float32'|'int64'})"
        )
    return inputs


def count_flops(model: nn.Module, inputs: Sequence[Any]) -> int:
    """FLOPs of one forward pass on ``inputs`` (torch's FLOP counter; matmuls and convs)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(*inputs)
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())


def accumulate_gradients(model: nn.Module, task: Task, ctx: Context, batches: int) -> None:
    """Sum the task loss gradients of ``batches`` training batches into ``param.grad``."""
    model.zero_grad(set_to_none=True)
    was_training = model.training
    model.eval()
    try:
        for batch in task.train_batches(ctx, batches, 32):
            task.loss(model, batch).backward()
    finally:
        model.train(was_training)


def task_loss(model: nn.Module, task: Task, ctx: Context, batches: int) -> float:
    """Mean task loss of ``model`` over ``batches`` training batches (eval mode, no grad)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        with torch.no_grad():
            for batch in task.train_batches(ctx, batches, 32):
                total += float(task.loss(model, batch))
                count += 1
    finally:
        model.train(was_training)
    if count == 0:
        raise ConfigError("the calibration data gave no batches; check --data")
    return total / count


def mean_abs_outputs(
    model: nn.Module, modules: Sequence[str], task: Task, ctx: Context, batches: int
) -> dict[str, torch.Tensor]:
    """Mean |output| per feature along the last axis (or axis 1 for channel-first outputs)
    of each named module, over ``batches`` training batches: ``{name: [features]}``."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook(name: str) -> Any:
        def fn(_m: nn.Module, _inp: Any, out: Any) -> None:
            t = out[0] if isinstance(out, (tuple, list)) else out
            if not isinstance(t, torch.Tensor) or t.dim() < 2:
                return
            axis = 1 if t.dim() > 2 and _channels_first(_m) else t.dim() - 1
            v = t.detach().abs().movedim(axis, 0).reshape(t.shape[axis], -1)
            sums[name] = sums.get(name, 0) + v.sum(1)  # type: ignore[assignment]
            counts[name] = counts.get(name, 0) + v.shape[1]

        return fn

    handles = [model.get_submodule(n).register_forward_hook(hook(n)) for n in modules]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in task.train_batches(ctx, batches, 32):
                task.forward(model, batch)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return {n: sums[n] / counts[n] for n in sums}


def _channels_first(module: nn.Module) -> bool:
    return any(c.__name__.startswith(("Conv", "BatchNorm")) for c in type(module).__mro__)
