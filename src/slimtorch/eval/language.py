"""Bits per character of a next-character model: the mean negative log2-likelihood of targets.

The model maps a window of ids before each target position to next-character logits
``[B, V]``; which window a position gets is the caller's (``windows(ids, positions)``: the
bundled char-lstm takes the 40 ids before, left-padded). To run in seconds an evaluator scores
a fixed, evenly spaced sample of positions (:func:`sample_positions`): the same positions for
every model.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from slimtorch.core.errors import UserInputError

BATCH = 1_000

# windows(ids, positions) -> the model's inputs predicting ids[positions]
Windows = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def sample_positions(candidates: torch.Tensor, n: int) -> torch.Tensor:
    """``n`` evenly spaced entries of ``candidates`` (all of them if there are fewer)."""
    if candidates.numel() <= n:
        return candidates
    idx = torch.linspace(0, candidates.numel() - 1, n).round().to(torch.int64)
    return candidates[idx]


def nll_bits(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed negative log2-likelihood of ``targets`` under ``logits`` (float64 scalar)."""
    return F.cross_entropy(logits.double(), targets, reduction="sum") / math.log(2.0)


@torch.no_grad()
def bits_per_char(
    model: nn.Module,
    ids: torch.Tensor,
    positions: torch.Tensor,
    windows: Windows,
    device: str = "cpu",
) -> float:
    """Mean bits per character of ``model`` predicting ``ids[p]`` from ``windows(ids, p)``,
    for ``p`` in ``positions`` (scored in batches of :data:`BATCH`)."""
    if positions.numel() == 0:
        raise UserInputError("no characters to score: the text has no positions to predict")
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64)
    try:
        for start in range(0, positions.numel(), BATCH):
            pos = positions[start : start + BATCH]
            logits = model(windows(ids, pos).to(device))
            total += nll_bits(logits.float().cpu(), ids[pos]).cpu()
    finally:
        model.train(was_training)
    return float(total) / positions.numel()
