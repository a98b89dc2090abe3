"""Task ``charlm``: next-character prediction for the textgenrnn-style character LSTM.

A batch is ``(inputs [B, 40] int64, targets [B] int64)``: random 40-character windows of the
training text (left-padded with 0 near its start) and the character after each. Training text:
the train split of ``builtin:austen`` (the first 90% of each novel, so evaluator ``bpc`` stays
held out), or the first 90% of another text spec. Out-of-vocabulary characters are never targets.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from slimtorch.calibrate.tasks import TASKS
from slimtorch.core.context import Context
from slimtorch.core.errors import UserInputError

DEFAULT_DATA = "builtin:austen"


def train_ids(data: str) -> torch.Tensor:
    """Encoded training text of the dataset spec ``data``."""
    from slimtorch.zoo import char_lstm

    return char_lstm.encoded_split(data, "train")


@dataclass
class CharLMTask:
    """Random windows of ``ids`` with their next character; cross-entropy loss."""

    ids: torch.Tensor
    name: str = "charlm"

    def __post_init__(self) -> None:
        from slimtorch.zoo.char_lstm import target_positions

        self.positions = target_positions(self.ids)
        if self.positions.numel() == 0:
            raise UserInputError(
                "the training text has no characters in the char-lstm vocabulary; give English text"
            )

    def train_batches(
        self, ctx: Context, steps: int, batch_size: int
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``steps`` batches of ``batch_size`` windows drawn with ``ctx.generator()``."""
        from slimtorch.zoo.char_lstm import context_windows

        gen = ctx.generator()
        for _ in range(steps):
            pick = torch.randint(0, self.positions.numel(), (batch_size,), generator=gen)
            pos = self.positions[pick]
            yield context_windows(self.ids, pos).to(ctx.device), self.ids[pos].to(ctx.device)

    def forward(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return model(batch[0])  # type: ignore[no-any-return]

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return self.loss_from_output(self.forward(model, batch), batch)

    def loss_from_output(
        self, output: torch.Tensor, batch: tuple[torch.Tensor, torch.Tensor]
    ) -> torch.Tensor:
        """Cross-entropy of next-character logits ``output [B, V]`` on the targets."""
        return F.cross_entropy(output, batch[1])


def make_charlm(data: str | None) -> CharLMTask:
    """Task factory ``charlm`` (``data``: None for builtin:austen, a text spec otherwise)."""
    return CharLMTask(train_ids(DEFAULT_DATA if data is None else data))


TASKS.add("charlm", make_charlm)
