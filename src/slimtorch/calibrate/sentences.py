"""Task ``sentences``: running text cut into sentences, for sentence encoders without labels.

A batch is ``(input_ids [B, L], attention_mask [B, L])`` int64: random sentences of the text,
tokenized with the model's ``tokenizer.json`` (MiniLM's by default). The task's output is the
mean-pooled, L2-normalised sentence embedding. There are no labels, so the task only trains by
distillation (``distill.finetune``, or ``distill.teacher`` before a training stage).

Data: text specs (``builtin:NAME`` texts such as ``builtin:austen``, a ``.txt`` path; see
:mod:`slimtorch.calibrate.text`) joined by ``+``; default ``builtin:austen+builtin:wikipedia``.
The task factory ``sentences`` is registered by the bundled zoo.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from slimtorch.calibrate.text import load_text, tokenizer_file
from slimtorch.core.context import Context
from slimtorch.core.errors import ConfigError, UserInputError

DEFAULT_SENTENCES = "builtin:austen+builtin:wikipedia"
DEFAULT_TOKENIZER = "builtin:minilm"
MIN_WORDS, MAX_WORDS = 4, 64

Batch = tuple[torch.Tensor, torch.Tensor]

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|(?<=[.!?][\"'\u201d\u2019)])\s+")


def split_sentences(text: str, min_words: int = MIN_WORDS, max_words: int = MAX_WORDS) -> list[str]:
    """Sentences of running text (split after . ! ?), whitespace collapsed, ``min..max`` words."""
    flat = " ".join(text.split())
    out = []
    for sentence in _SENTENCE_END.split(flat):
        words = len(sentence.split())
        if min_words <= words <= max_words:
            out.append(sentence)
    return out


@lru_cache(maxsize=4)
def _sentences(spec: str) -> tuple[str, ...]:
    seen: dict[str, None] = {}
    for part in spec.split("+"):
        for sentence in split_sentences(load_text(part.strip())):
            seen.setdefault(sentence, None)
    return tuple(seen)


def load_sentences(spec: str) -> list[str]:
    """Distinct sentences of ``spec``: text specs (``builtin:NAME``, a .txt path) joined by
    ``+``, in order of first appearance."""
    sentences = list(_sentences(spec))
    if not sentences:
        raise UserInputError(
            f"no sentences of {MIN_WORDS} to {MAX_WORDS} words in {spec!r}; give running English"
            " text"
        )
    return sentences


@lru_cache(maxsize=4)
def _tokenizer(path: str, max_len: int) -> Any:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(path)
    tok.no_padding()
    tok.enable_truncation(max_length=max_len)
    return tok


def pad_ids(ids: Sequence[Sequence[int]]) -> Batch:
    """``(input_ids, attention_mask)`` int64 ``[N, longest]`` of token id lists, right-padded
    with 0."""
    if not ids:
        raise UserInputError("nothing to pad: give at least one token sequence")
    width = max(len(i) for i in ids)
    input_ids = torch.zeros(len(ids), width, dtype=torch.int64)
    mask = torch.zeros(len(ids), width, dtype=torch.int64)
    for row, seq in enumerate(ids):
        input_ids[row, : len(seq)] = torch.tensor(list(seq), dtype=torch.int64)
        mask[row, : len(seq)] = 1
    return input_ids, mask


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``hidden [N, L, D]`` over positions where ``mask [N, L]`` is set, L2 normalised."""
    m = mask.to(hidden.dtype).unsqueeze(-1)
    summed = (hidden * m).sum(dim=1)
    pooled = summed / m.sum(dim=1).clamp(min=1e-9)
    return F.normalize(pooled.float(), p=2, dim=-1)


def last_hidden(out: Any) -> torch.Tensor:
    """The hidden states ``[batch, tokens, dim]`` of an encoder's output (``last_hidden_state``)."""
    hidden = getattr(out, "last_hidden_state", None)
    if hidden is None:
        hidden = out[0] if isinstance(out, (tuple, list)) else out
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
        raise UserInputError(
            "the model must return hidden states [batch, tokens, dim] (a BertModel-like encoder)"
        )
    return hidden


class SentenceTask:
    """Random batches of tokenized sentences; output: mean-pooled, L2-normalised embeddings."""

    name = "sentences"
    output_kind = "embedding"
    has_labels = False

    def __init__(
        self, sentences: Sequence[str], tokenizer: str | None = None, max_len: int = 128
    ) -> None:
        """``tokenizer``: a tokenizer spec (see :func:`tokenizer_file`); None: MiniLM's."""
        if not sentences:
            raise UserInputError("no sentences to train on; give text with sentences in it")
        if max_len < 2:
            raise ConfigError(f"max_len must be >= 2 tokens ([CLS] and [SEP]), got {max_len}")
        self.sentences = list(sentences)
        self.tokenizer_path = str(tokenizer_file(tokenizer or DEFAULT_TOKENIZER))
        self.max_len = max_len

    def tokenize(self, texts: Sequence[str]) -> Batch:
        """``(input_ids, attention_mask)`` int64 ``[N, longest]`` (at most ``max_len`` tokens)."""
        tok = _tokenizer(self.tokenizer_path, self.max_len)
        return pad_ids([e.ids for e in tok.encode_batch(list(texts))])

    def train_batches(self, ctx: Context, steps: int, batch_size: int) -> Iterator[Batch]:
        """``steps`` batches of ``batch_size`` sentences drawn with ``ctx.generator(17)``."""
        gen = ctx.generator(17)
        for _ in range(steps):
            pick = torch.randint(0, len(self.sentences), (batch_size,), generator=gen)
            ids, mask = self.tokenize([self.sentences[i] for i in pick.tolist()])
            yield ids.to(ctx.device), mask.to(ctx.device)

    def forward(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """Sentence embeddings ``[B, D]`` of the batch (mean pooling, L2 norm)."""
        ids, mask = batch
        vocab = getattr(getattr(model, "config", None), "vocab_size", None)
        if isinstance(vocab, int) and int(ids.max()) >= vocab:
            raise ConfigError(
                f"token id {int(ids.max())} is outside the model's vocabulary ({vocab}); give the"
                " model's own tokenizer with `tokenizer:`"
            )
        return mean_pool(last_hidden(model(ids, mask)), mask)

    def token_mask(self, batch: Batch) -> torch.Tensor:
        """The attention mask ``[B, L]`` (which positions are real tokens)."""
        return batch[1]

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        raise ConfigError(
            "task 'sentences' has no labels: it trains only by distillation (distill.finetune,"
            " or distill.teacher before a training stage)"
        )
