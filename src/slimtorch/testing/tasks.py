"""A Task from tensors, for tests (yours and ours): no Task class to write.

    task = tensor_task(x, y)                         # (x, y) batches, cross-entropy
    task = tensor_task(x, model_to_fit(x), loss="mse")
    task = tensor_task(ids, loss="next_token")       # a language model on its own tokens
    task = tensor_task(x)                            # inputs only: calibration (GPTQ, Wanda, ...)
    st.compress(model, recipe, data=task)

Batches follow calibrate.loader's convention (``(inputs, targets)`` or bare inputs). Unlike a
DataLoader, the stage's ``batch_size`` is honoured: every epoch is a fresh shuffle (by the run's
seed, ``ctx.generator()``) cut into batches of that size; a batch never spans two epochs.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Literal

import torch
import torch.nn.functional as F

from slimtorch.calibrate.lm import logits_of, next_token_loss
from slimtorch.calibrate.loader import BatchTask, LossFn
from slimtorch.core.context import Context
from slimtorch.core.errors import ConfigError

LossName = Literal["cross_entropy", "mse", "next_token"]


def cross_entropy(output: Any, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of logits ``[..., C]`` on class indices ``[...]``."""
    logits = logits_of(output)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def mse(output: Any, targets: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(logits_of(output), targets)


def next_token(output: Any, tokens: torch.Tensor) -> torch.Tensor:
    """Causal language modelling: logits at position t predict token t + 1."""
    return next_token_loss(logits_of(output), tokens)


LOSSES: dict[str, LossFn] = {"cross_entropy": cross_entropy, "mse": mse, "next_token": next_token}


class TensorTask(BatchTask):
    """Shuffled batches of ``inputs`` (and ``targets``) at the size each stage asks for."""

    no_loss = (
        "this stage trains the model, but the task has inputs only: give targets"
        " (tensor_task(inputs, targets, loss=...)) or loss='next_token'"
    )

    def __init__(
        self,
        inputs: torch.Tensor,
        targets: torch.Tensor | None,
        loss_fn: LossFn | None,
        name: str = "tensors",
    ) -> None:
        super().__init__(loss_fn)
        if targets is not None and len(targets) != len(inputs):
            raise ConfigError(f"{len(inputs)} inputs but {len(targets)} targets: give one each")
        if len(inputs) == 0:
            raise ConfigError("no inputs: give at least one example")
        self.inputs, self.targets, self.name = inputs, targets, name

    @property
    def has_labels(self) -> bool:
        return self.loss_fn is not None and self.targets is not None

    def train_batches(self, ctx: Context, steps: int, batch_size: int) -> Iterator[Any]:
        """``steps`` batches of ``batch_size`` on ``ctx.device``, reshuffled every epoch."""
        gen, n, pos = ctx.generator(), len(self.inputs), len(self.inputs)
        order = torch.arange(n)
        for _ in range(steps):
            if pos >= n:
                order, pos = torch.randperm(n, generator=gen), 0
            idx = order[pos : pos + batch_size]
            pos += len(idx)
            x = self.inputs[idx].to(ctx.device)
            yield x if self.targets is None else (x, self.targets[idx].to(ctx.device))


def tensor_task(
    inputs: torch.Tensor,
    targets: torch.Tensor | None = None,
    loss: LossName | LossFn = "cross_entropy",
    name: str = "tensors",
) -> TensorTask:
    """A Task over the examples ``inputs`` (first dimension) and their ``targets``.

    ``loss`` is ``"cross_entropy"`` (logits against class indices; sequence outputs are
    flattened), ``"mse"``, ``"next_token"`` (the targets are the inputs themselves, shifted) or
    ``loss(output, targets)``; a Hugging Face output counts by its ``.logits``. Without targets
    (and not ``next_token``) the task only calibrates: a stage that trains raises a ConfigError.
    """
    if isinstance(loss, str) and loss not in LOSSES:
        raise ConfigError(f"unknown loss {loss!r}: give one of {', '.join(LOSSES)} or a function")
    loss_fn = LOSSES[loss] if isinstance(loss, str) else loss
    if loss == "next_token" and targets is None:
        targets = inputs
    return TensorTask(inputs, targets, loss_fn if targets is not None else None, name)
