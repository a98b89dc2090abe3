"""Causal language modelling: next-token prediction on random windows of a token stream.

A batch is ``(input_ids [B, L],)`` int64: windows of the token ids at uniformly random starts
(``L`` = :data:`WINDOW` by default). The loss is the mean next-token cross-entropy of
``model(input_ids).logits``; ``forward`` returns the logits.
:meth:`CausalLMTask.calibration_windows` draws a GPTQ-style calibration set (``n`` random
windows of ``length`` tokens, seeded), as IST-DASLab/gptq draws 128 x 2048-token windows of C4.

The task ``causal-lm`` (the train split of text specs under the model's own tokenizer, by default
``builtin:austen-lm``'s, so that evaluator ``perplexity``'s held-out text is never seen) is
registered by the bundled zoo. :func:`check_vocab` refuses ids the model has no embedding for.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from slimtorch.core.context import Context
from slimtorch.core.errors import UnsupportedModelError, UserInputError

WINDOW = 256

Batch = tuple[torch.Tensor]


def random_windows(ids: torch.Tensor, n: int, length: int, gen: torch.Generator) -> torch.Tensor:
    """``n`` windows ``[n, length]`` of the 1-D ``ids`` at uniformly random starts."""
    if n < 1 or length < 2:
        raise UserInputError(f"need n >= 1 windows of length >= 2, got n={n}, length={length}")
    if ids.numel() < length:
        raise UserInputError(
            f"the text has {ids.numel()} tokens, fewer than one window of {length}; give more"
            " text or a shorter length"
        )
    starts = torch.randint(0, ids.numel() - length + 1, (n,), generator=gen)
    return ids[starts.unsqueeze(1) + torch.arange(length)]


def check_vocab(ids: torch.Tensor, vocab_size: int | None, tokenizer: str | None) -> None:
    """Refuse token ``ids`` at or beyond the model's ``vocab_size`` (a tokenizer not its own)."""
    top = int(ids.max()) if ids.numel() else -1
    if vocab_size is not None and top >= vocab_size:
        raise UserInputError(
            f"the calibration text's token ids reach {top} under tokenizer {tokenizer!r}, but the"
            f" model has {vocab_size} embeddings: that tokenizer is not the model's; give the"
            " model's own with --tokenizer"
        )


def logits_of(output: Any) -> torch.Tensor:
    """The tensor in a model's output: itself, its ``.logits`` (Hugging Face), or its first item."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, (tuple, list)) and output:
        return logits_of(output[0])
    raise TypeError(f"cannot find the output tensor in a {type(output).__name__}")


def next_token_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of ``logits [B, L, V]`` predicting ``ids [B, L]`` one step ahead."""
    if logits.dim() != 3 or logits.shape[:2] != ids.shape:
        raise UnsupportedModelError(
            f"causal-lm needs logits [batch, tokens, vocab] for ids {tuple(ids.shape)}, got"
            f" {tuple(logits.shape)}; use a causal LM (e.g. a transformers *ForCausalLM)"
        )
    pred = logits[:, :-1].reshape(-1, logits.shape[-1])
    return F.cross_entropy(pred.float(), ids[:, 1:].reshape(-1))


@dataclass
class CausalLMTask:
    """Random ``window``-token slices of the stream ``ids``; next-token cross-entropy."""

    ids: torch.Tensor
    window: int = WINDOW
    name: str = "causal-lm"

    def __post_init__(self) -> None:
        if self.ids.dim() != 1 or self.ids.dtype != torch.int64:
            raise UserInputError("causal-lm needs a 1-D int64 tensor of token ids")
        if self.ids.numel() < self.window:
            raise UserInputError(
                f"the training text has {self.ids.numel()} tokens, fewer than one window of"
                f" {self.window}; give more text"
            )

    def train_batches(self, ctx: Context, steps: int, batch_size: int) -> Iterator[Batch]:
        """``steps`` batches of ``batch_size`` windows drawn with ``ctx.generator()``."""
        gen = ctx.generator()
        for _ in range(steps):
            yield (random_windows(self.ids, batch_size, self.window, gen).to(ctx.device),)

    def calibration_windows(self, n: int, length: int | None = None, seed: int = 0) -> torch.Tensor:
        """``n`` random windows ``[n, length]`` (default the task's window), seeded by ``seed``."""
        gen = torch.Generator().manual_seed(seed)
        return random_windows(self.ids, n, length or self.window, gen)

    def forward(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """The logits ``[B, L, V]`` of ``model`` on the batch's ids."""
        return logits_of(model(batch[0]))

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        return self.loss_from_output(self.forward(model, batch), batch)

    def loss_from_output(self, output: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Next-token cross-entropy of the logits ``output`` on the batch's ids."""
        return next_token_loss(output, batch[0])
