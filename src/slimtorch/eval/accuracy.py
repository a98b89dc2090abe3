"""Top-1 classification accuracy of a model on inputs and their labels."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from slimtorch.core.errors import UserInputError
from slimtorch.eval.latency import model_device


@torch.no_grad()
def accuracy(
    model: nn.Module,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int = 1000,
    prepare: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> float:
    """Percent (0-100) of ``inputs`` whose top-1 prediction equals ``labels``.

    ``prepare`` maps a batch of ``inputs`` to what the model takes (e.g. uint8 images to
    normalised floats); None passes them as they are. The model is put in eval mode; its
    training flag is restored afterwards.
    """
    if len(inputs) != len(labels):
        raise UserInputError(
            f"{len(inputs)} inputs but {len(labels)} labels; give one label per input"
        )
    if len(labels) == 0:
        raise UserInputError("no inputs to evaluate; the dataset split is empty")
    if batch_size < 1:
        raise UserInputError(f"batch_size must be at least 1, got {batch_size}")
    was_training = model.training
    model.eval()
    device = model_device(model)
    correct = 0
    try:
        for start in range(0, len(labels), batch_size):
            x = inputs[start : start + batch_size]
            x = prepare(x) if prepare is not None else x
            pred = model(x.to(device)).argmax(dim=1).cpu()
            correct += int((pred == labels[start : start + batch_size]).sum())
    finally:
        model.train(was_training)
    return 100.0 * correct / len(labels)
