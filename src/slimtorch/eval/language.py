"""Evaluator ``bpc``: bits per character of a character language model on held-out text.

The model maps ``ids [B, 40]`` (textgenrnn's vocabulary, left-padded with 0) to next-character
logits ``[B, V]``. The text is the held-out split (the last 10% of each Austen novel for
``builtin:austen``; the last 10% of the text otherwise). To run in seconds it scores a fixed,
evenly spaced sample of :data:`SAMPLE` target positions — the same positions for every model.
Characters outside the vocabulary are never targets (they cannot be predicted); on input they
are 0, as textgenrnn encodes them.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from slimtorch.core.context import Context
from slimtorch.core.errors import UserInputError
from slimtorch.eval.quality import EVALUATORS, Quality

SAMPLE = 20_000
BATCH = 1_000


def sample_positions(candidates: torch.Tensor, n: int) -> torch.Tensor:
    """``n`` evenly spaced entries of ``candidates`` (all of them if there are fewer)."""
    if candidates.numel() <= n:
        return candidates
    idx = torch.linspace(0, candidates.numel() - 1, n).round().to(torch.int64)
    return candidates[idx]


def nll_bits(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed negative log2-likelihood of ``targets`` under ``logits`` (float64 scalar)."""
    return F.cross_entropy(logits.double(), targets, reduction="sum") / math.log(2.0)


def heldout_ids(data: str) -> torch.Tensor:
    """Encoded held-out text of the dataset spec ``data``."""
    from slimtorch.zoo import char_lstm

    return char_lstm.encoded_split(data, "heldout")


@torch.no_grad()
def bits_per_char(
    model: nn.Module, ids: torch.Tensor, positions: torch.Tensor, device: str = "cpu"
) -> float:
    """Mean bits per character of ``model`` predicting ``ids[p]`` from the 40 before, for ``p`` in ``positions``."""
    from slimtorch.zoo.char_lstm import context_windows

    if positions.numel() == 0:
        raise UserInputError(
            "no characters to score: the held-out text has no in-vocabulary targets"
        )
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64)
    try:
        for start in range(0, positions.numel(), BATCH):
            pos = positions[start : start + BATCH]
            logits = model(context_windows(ids, pos).to(device))
            total += nll_bits(logits.float().cpu(), ids[pos]).cpu()
    finally:
        model.train(was_training)
    return float(total) / positions.numel()


def evaluate_bpc(model: nn.Module, ctx: Context, data: Any) -> Quality:
    """Evaluator ``bpc`` on ``data`` (default ``builtin:austen``)."""
    from slimtorch.zoo.char_lstm import target_positions

    spec = "builtin:austen" if data is None else str(data)
    ids = heldout_ids(spec)
    positions = sample_positions(target_positions(ids), SAMPLE)
    bpc = bits_per_char(model, ids, positions, ctx.device)
    return Quality(
        "bits_per_char", bpc, higher_is_better=False, extra={"positions": float(positions.numel())}
    )


EVALUATORS.add("bpc", evaluate_bpc)
