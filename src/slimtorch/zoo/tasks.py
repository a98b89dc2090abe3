"""The bundled training tasks, registered in :data:`slimtorch.calibrate.tasks.TASKS`.

* ``classification``: shuffled image batches of a dataset's train split (Fashion-MNIST,
  builtin:mnist5k, an .npz), normalised as the bundled classifiers expect; cross-entropy.
* ``charlm``: next-character prediction for the char-lstm: random 40-character windows of the
  training text (left-padded with 0 near its start) and the character after each. Text: the
  train split of ``builtin:austen`` (the first 90% of each novel, so evaluator ``bpc`` stays
  held out), or the first 90% of another text spec. Out-of-vocabulary characters are never
  targets.
* ``sentences``: sentences of text specs (default Austen + Wikipedia) under MiniLM's tokenizer
  (:class:`slimtorch.calibrate.sentences.SentenceTask`); trains only by distillation.
* ``causal-lm``: random windows of the train split (first 90% of each novel, article or file) of
  text specs, tokenized with the model's own tokenizer (``tokenizer``: a ``tokenizer.json`` path
  or ``builtin:NAME``; ``builtin:austen-lm``'s when None)
  (:class:`slimtorch.calibrate.lm.CausalLMTask`); default Austen + Wikipedia. The held-out 10%
  is what evaluator ``perplexity`` scores, so calibration never sees it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from slimtorch.calibrate.classification import epoch_batches
from slimtorch.calibrate.lm import WINDOW, CausalLMTask
from slimtorch.calibrate.sentences import DEFAULT_SENTENCES, SentenceTask, load_sentences
from slimtorch.calibrate.tasks import TASKS
from slimtorch.calibrate.text import tokenizer_file
from slimtorch.core.context import Context
from slimtorch.core.errors import UserInputError
from slimtorch.zoo import austen_lm, char_lstm
from slimtorch.zoo.data_images import load_image_dataset, to_model_input

CHARLM_DATA = "builtin:austen"
LM_DATA = "builtin:austen+builtin:wikipedia"

Batch = tuple[torch.Tensor, torch.Tensor]


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


@dataclass
class CharLMTask:
    """Random windows of ``ids`` with their next character; cross-entropy loss."""

    ids: torch.Tensor
    name: str = "charlm"

    def __post_init__(self) -> None:
        self.positions = char_lstm.target_positions(self.ids)
        if self.positions.numel() == 0:
            raise UserInputError(
                "the training text has no characters in the char-lstm vocabulary; give English text"
            )

    def train_batches(self, ctx: Context, steps: int, batch_size: int) -> Iterator[Batch]:
        """``steps`` batches of ``batch_size`` windows drawn with ``ctx.generator()``."""
        gen = ctx.generator()
        for _ in range(steps):
            pick = torch.randint(0, self.positions.numel(), (batch_size,), generator=gen)
            pos = self.positions[pick]
            windows = char_lstm.context_windows(self.ids, pos)
            yield windows.to(ctx.device), self.ids[pos].to(ctx.device)

    def forward(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        return model(batch[0])  # type: ignore[no-any-return]

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        return self.loss_from_output(self.forward(model, batch), batch)

    def loss_from_output(self, output: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Cross-entropy of next-character logits ``output [B, V]`` on the targets."""
        return F.cross_entropy(output, batch[1])


def make_charlm(data: str | None) -> CharLMTask:
    """Task factory ``charlm`` (``data``: None for builtin:austen, a text spec otherwise)."""
    return CharLMTask(char_lstm.encoded_split(CHARLM_DATA if data is None else data, "train"))


def make_sentences(data: str | None) -> SentenceTask:
    """Task factory ``sentences`` (``data``: text specs joined by ``+``; None = Austen +
    Wikipedia), with MiniLM's tokenizer."""
    return SentenceTask(load_sentences(DEFAULT_SENTENCES if data is None else data))


def lm_train_ids(data: str, tokenizer: str | None = None) -> torch.Tensor:
    """Token ids of the train split of the text spec ``data`` under ``tokenizer`` (a
    ``tokenizer.json`` path or ``builtin:NAME``; None: builtin:austen-lm's)."""
    path = str(tokenizer_file(tokenizer)) if tokenizer else None
    return austen_lm.encoded_split(data, "train", path)


def calibration_windows(
    n: int, length: int = WINDOW, seed: int = 0, data: str = LM_DATA, tokenizer: str | None = None
) -> torch.Tensor:
    """GPTQ-style calibration set: ``n`` random ``length``-token windows of ``data``'s train
    split under ``tokenizer`` (None: builtin:austen-lm's)."""
    ids = lm_train_ids(data, tokenizer)
    return CausalLMTask(ids, window=length).calibration_windows(n, length, seed)


def make_causal_lm(data: str | None, tokenizer: str | None = None) -> CausalLMTask:
    """Task factory ``causal-lm`` (``data``: None for Austen + Wikipedia, else a text spec;
    ``tokenizer``: the model's, a ``tokenizer.json`` path or ``builtin:NAME``; None for
    builtin:austen-lm's)."""
    return CausalLMTask(lm_train_ids(LM_DATA if data is None else data, tokenizer))


TASKS.add("classification", ClassificationTask)
TASKS.add("charlm", make_charlm)
TASKS.add("sentences", make_sentences)
TASKS.add("causal-lm", make_causal_lm)
