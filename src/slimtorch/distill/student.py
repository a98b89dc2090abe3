"""Smaller students from a teacher, and the sentences a text-encoder student learns from.

:func:`shrink_layers` removes blocks from the model's stack of layers (Hugging Face encoders and
decoders: ``encoder.layer``, ``model.layers``, ``h``...; in general the nn.ModuleList of
same-class blocks holding the most parameters). The kept blocks are the teacher's own modules,
so they keep their weights *and* their compression states (masks, quantization grids). The model's
config (``num_hidden_layers`` and per-layer lists such as ``layer_types``) is updated, and for
Hugging Face models the recorded architecture is refreshed so the saved artifact rebuilds the
smaller model.

:class:`SentenceTask` is the training data of a sentence encoder (MiniLM) that has no labels: batches
of tokenized sentences from running text (Austen, Wikipedia, any .txt), the output being the
mean-pooled, L2-normalised sentence embedding. It only trains through distillation.
"""

from __future__ import annotations

import itertools
import logging
import re
from collections.abc import Iterator, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimtorch.core.context import Context
from slimtorch.core.errors import ConfigError, UnsupportedModelError, UserInputError
from slimtorch.distill.trainer import HiddenPair, first_tensor, get_module
from slimtorch.graph.weights import replace_module
from slimtorch.models.artifact import set_architecture

log = logging.getLogger(__name__)

_LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")
_PER_LAYER_KEYS = ("layer_types",)


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def find_layer_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """``(name, list)`` of the model's stack of blocks: the largest uniform nn.ModuleList."""
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) < 2:
            continue
        if len({type(child) for child in module}) != 1:
            continue
        size = _numel(module)
        if best is None or size > best[0]:
            best = (size, name, module)
    if best is None:
        raise UnsupportedModelError(
            f"{type(model).__name__} has no nn.ModuleList of two or more same-class blocks to"
            " keep layers from; name the list with `layers` (its module name)"
        )
    return best[1], best[2]


def _layer_list(model: nn.Module, layers: str | None) -> tuple[str, nn.ModuleList]:
    if layers is None:
        return find_layer_list(model)
    module = get_module(model, layers, "model")
    if not isinstance(module, nn.ModuleList):
        raise ConfigError(
            f"`layers` {layers!r} is a {type(module).__name__}, not an nn.ModuleList of blocks"
        )
    return layers, module


def check_keep(keep: Sequence[int], count: int) -> list[int]:
    """``keep`` as a list: non-empty, strictly increasing, within ``0 .. count - 1``."""
    out = [int(i) for i in keep]
    if not out:
        raise ConfigError("`keep` is empty: give the indices of the layers to keep, e.g. [0, 2, 4]")
    bad = [i for i in out if not 0 <= i < count]
    if bad:
        raise ConfigError(f"layer indices {bad} out of range: the model has layers 0..{count - 1}")
    if any(b <= a for a, b in itertools.pairwise(out)):
        raise ConfigError(f"`keep` {out} must be strictly increasing (each layer once, in order)")
    return out


def _renumber(blocks: nn.ModuleList) -> None:
    """Set ``layer_idx`` (used by Hugging Face KV caches) to each block's new position."""
    for i, block in enumerate(blocks):
        for module in block.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                setattr(module, "layer_idx", i)  # noqa: B010


def _update_config(model: nn.Module, keep: list[int], old_count: int) -> None:
    config = getattr(model, "config", None)
    if config is None:
        return
    for key in _LAYER_COUNT_KEYS:
        if getattr(config, key, None) == old_count:
            setattr(config, key, len(keep))
    for key in _PER_LAYER_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, list) and len(value) == old_count:
            setattr(config, key, [value[i] for i in keep])


def hf_architecture(model: nn.Module) -> dict[str, Any] | None:
    """The ``{"kind": "hf", ...}`` spec (see slimtorch.models.hf) of a live transformers model."""
    config = getattr(model, "config", None)
    module = type(model).__module__
    if config is None or not module.startswith("transformers.") or not hasattr(config, "to_dict"):
        return None
    dtype = next(model.parameters()).dtype
    return {
        "kind": "hf",
        "class": type(model).__name__,
        "config": config.to_dict(),
        "attn_implementation": str(getattr(config, "_attn_implementation", None) or "eager"),
        "dtype": str(dtype).removeprefix("torch."),
    }


def refresh_architecture(model: nn.Module) -> None:
    """Record the model's current architecture so that its artifact rebuilds this shape."""
    arch = hf_architecture(model)
    if arch is not None:
        set_architecture(model, arch)
    else:
        log.warning(
            "%s is not a Hugging Face model: its recorded architecture still has every layer,"
            " so slimtorch.load cannot rebuild the shrunk model from the artifact",
            type(model).__name__,
        )


def shrink_layers(model: nn.Module, keep: Sequence[int], layers: str | None = None) -> nn.Module:
    """Keep only blocks ``keep`` of the model's layer list (``layers``: its name; None = find it).

    Works in place and returns ``model``. The kept blocks keep their weights and states.
    """
    name, blocks = _layer_list(model, layers)
    kept = check_keep(keep, len(blocks))
    new = nn.ModuleList([blocks[i] for i in kept])
    _renumber(new)
    replace_module(model, name, new)
    _update_config(model, kept, len(blocks))
    refresh_architecture(model)
    before, after = len(blocks), len(kept)
    log.info("kept layers %s of %d in %r (%d -> %d)", kept, before, name, before, after)
    return model


def layer_pairs(
    layers: str, keep: Sequence[int], loss: str = "mse", weight: float = 1.0
) -> list[HiddenPair]:
    """Hidden-state pairs student ``layers.i`` <- teacher ``layers.keep[i]`` (after a shrink)."""
    return [
        HiddenPair(student=f"{layers}.{i}", teacher=f"{layers}.{k}", loss=loss, weight=weight)  # type: ignore[arg-type]
        for i, k in enumerate(keep)
    ]


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|(?<=[.!?][\"'\u201d\u2019)])\s+")


def split_sentences(text: str, min_words: int = 4, max_words: int = 64) -> list[str]:
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
    from slimtorch.models.data_text import load_text

    seen: dict[str, None] = {}
    for part in spec.split("+"):
        for sentence in split_sentences(load_text(part.strip())):
            seen.setdefault(sentence, None)
    return tuple(seen)


def load_sentences(spec: str) -> list[str]:
    """Distinct sentences of ``spec``: text specs (builtin:austen, builtin:wikipedia, a .txt
    path) joined by ``+``."""
    sentences = list(_sentences(spec))
    if not sentences:
        raise UserInputError(
            f"no sentences of 4 to 64 words in {spec!r}; give running English text"
        )
    return sentences


@lru_cache(maxsize=4)
def _tokenizer(path: str, max_len: int) -> Any:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(path)
    tok.no_padding()
    tok.enable_truncation(max_length=max_len)
    return tok


def tokenizer_file(spec: str | None) -> Path:
    """``tokenizer.json`` of ``spec`` (the file or its directory); None = MiniLM's."""
    if spec is None:
        from slimtorch.models.minilm import model_dir

        return model_dir() / "tokenizer.json"
    path = Path(spec)
    path = path / "tokenizer.json" if path.is_dir() else path
    if not path.is_file():
        raise UserInputError(
            f"no tokenizer at {spec!r}: give a tokenizer.json file or a directory holding one"
        )
    return path


class SentenceTask:
    """Random batches of tokenized sentences; output: mean-pooled, L2-normalised embeddings."""

    name = "sentences"
    output_kind = "embedding"
    has_labels = False

    def __init__(self, sentences: Sequence[str], tokenizer: str | None = None, max_len: int = 128):
        if not sentences:
            raise UserInputError("no sentences to train on; give text with sentences in it")
        self.sentences = list(sentences)
        self.tokenizer_path = str(tokenizer_file(tokenizer))
        self.max_len = max_len

    def tokenize(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input_ids, attention_mask)`` int64 ``[N, longest]``."""
        tok = _tokenizer(self.tokenizer_path, self.max_len)
        ids = [e.ids for e in tok.encode_batch(list(texts))]
        width = max(len(i) for i in ids)
        input_ids = torch.zeros(len(ids), width, dtype=torch.int64)
        mask = torch.zeros(len(ids), width, dtype=torch.int64)
        for row, seq in enumerate(ids):
            input_ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.int64)
            mask[row, : len(seq)] = 1
        return input_ids, mask

    def train_batches(
        self, ctx: Context, steps: int, batch_size: int
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        gen = ctx.generator(17)
        for _ in range(steps):
            pick = torch.randint(0, len(self.sentences), (batch_size,), generator=gen)
            ids, mask = self.tokenize([self.sentences[i] for i in pick.tolist()])
            yield ids.to(ctx.device), mask.to(ctx.device)

    def forward(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        from slimtorch.models.minilm import mean_pool

        ids, mask = batch
        vocab = getattr(getattr(model, "config", None), "vocab_size", None)
        if isinstance(vocab, int) and int(ids.max()) >= vocab:
            raise ConfigError(
                f"token id {int(ids.max())} is outside the model's vocabulary ({vocab}); give the"
                " model's own tokenizer with `tokenizer:`"
            )
        return mean_pool(first_tensor(model(ids, mask)), mask)

    def token_mask(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return batch[1]

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        raise ConfigError(
            "task 'sentences' has no labels: it trains only by distillation (distill.finetune,"
            " or distill.teacher before a training stage)"
        )
