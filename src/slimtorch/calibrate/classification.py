"""Task "classification": shuffled image batches from a dataset's train split, cross-entropy loss."""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from slimtorch.calibrate.tasks import TASKS
from slimtorch.core.context import Context
from slimtorch.core.errors import UserInputError
from slimtorch.zoo.data_images import load_image_dataset, to_model_input

Batch = tuple[torch.Tensor, torch.Tensor]


def epoch_batches(
    inputs: torch.Tensor, labels: torch.Tensor, steps: int, batch_size: int, gen: torch.Generator
) -> Iterator[Batch]:
    """``steps`` batches of ``(inputs, labels)``, reshuffled with ``gen`` at every epoch start.

    A batch never spans two epochs, so when ``batch_size`` does not divide ``N`` the last batch
    of an epoch is smaller; with ``batch_size > N`` every batch is the whole (shuffled) set.
    """
    n = len(labels)
    if n == 0:
        raise UserInputError("the training split is empty; give a dataset with images")
    order = torch.randperm(n, generator=gen)
    pos = 0
    for _ in range(steps):
        if pos >= n:
            order, pos = torch.randperm(n, generator=gen), 0
        idx = order[pos : pos + batch_size]
        pos += len(idx)
        yield inputs[idx], labels[idx]


class ClassificationTask:
    """Train split of an image dataset (``builtin:fashion-mnist``, ``builtin:mnist5k``, .npz)."""

    name = "classification"

    def __init__(self, data: str | None = None) -> None:
        self.data = data
        self._train: Batch | None = None

    def train_data(self) -> Batch:
        """uint8 images ``[N, 28, 28]`` and labels of the train split (loaded once)."""
        if self._train is None:
            self._train = load_image_dataset(self.data, "train")
        return self._train

    def train_batches(self, ctx: Context, steps: int, batch_size: int) -> Iterator[Batch]:
        """``steps`` shuffled ``(x, y)`` batches on ``ctx.device``, cycling epochs as needed."""
        if steps < 0 or batch_size < 1:
            raise UserInputError(f"need steps >= 0 and batch_size >= 1, got {steps}, {batch_size}")
        inputs, labels = self.train_data()
        if len(labels) == 0:
            raise UserInputError(f"the train split of {self.data!r} is empty; give images")
        batches = epoch_batches(inputs, labels, steps, batch_size, ctx.generator())
        return ((to_model_input(x).to(ctx.device), y.to(ctx.device)) for x, y in batches)

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        return self.loss_from_output(self.forward(model, batch), batch)

    def loss_from_output(self, output: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Cross-entropy of logits ``output [B, C]`` (from :meth:`forward`) on the labels."""
        return F.cross_entropy(output, batch[1])

    def forward(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        return model(batch[0])  # type: ignore[no-any-return]


TASKS.add("classification", ClassificationTask)
