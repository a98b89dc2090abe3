"""Shuffled epochs of labelled examples: the batches of a classification task.

The task ``classification`` (image datasets, cross-entropy) is registered by the bundled zoo.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from slimtorch.core.errors import UserInputError

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
