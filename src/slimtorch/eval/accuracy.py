"""Top-1 classification accuracy on the test split of an image dataset (evaluator "accuracy")."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from slimtorch.core.context import Context
from slimtorch.core.errors import UserInputError
from slimtorch.eval.quality import EVALUATORS, Quality
from slimtorch.zoo.data_images import load_image_dataset, to_model_input


def _model_device(model: nn.Module) -> torch.device:
    param = next(iter(model.parameters()), None)
    return param.device if param is not None else torch.device("cpu")


@torch.no_grad()
def accuracy(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 1000
) -> float:
    """Percent (0-100) of uint8 ``images [N, 28, 28]`` whose top-1 prediction equals ``labels``.

    The model is put in eval mode and left there; its training flag is restored afterwards.
    """
    if len(images) != len(labels):
        raise UserInputError(f"{len(images)} images but {len(labels)} labels; give one per image")
    if len(labels) == 0:
        raise UserInputError("no images to evaluate; the dataset split is empty")
    if batch_size < 1:
        raise UserInputError(f"batch_size must be at least 1, got {batch_size}")
    was_training = model.training
    model.eval()
    device = _model_device(model)
    correct = 0
    try:
        for start in range(0, len(labels), batch_size):
            x = to_model_input(images[start : start + batch_size]).to(device)
            pred = model(x).argmax(dim=1).cpu()
            correct += int((pred == labels[start : start + batch_size]).sum())
    finally:
        model.train(was_training)
    return 100.0 * correct / len(labels)


def evaluate_accuracy(model: nn.Module, ctx: Context, data: Any) -> Quality:
    """Evaluator "accuracy": top-1 percent on the test split of ``data`` (None: Fashion-MNIST)."""
    images, labels = load_image_dataset(data, "test")
    value = accuracy(model, images, labels)
    return Quality("accuracy", value, higher_is_better=True, extra={"images": float(len(labels))})


EVALUATORS.add("accuracy", evaluate_accuracy)
