"""Perplexity of a causal language model on token ids, GPTQ's protocol.

The ids (one tokenized stream, no special tokens) are cut into non-overlapping windows of the
model's context (``max_position_embeddings``, at most :data:`MAX_CONTEXT`; a trailing partial
window is dropped), and each window is scored on its own: the mean negative log-likelihood of
every token after the first, over all windows, exponentiated. This is what IST-DASLab/gptq's
``eval`` computes (each window's mean weighs the same), so numbers compare.

Works on any Hugging Face causal LM (``model(input_ids).logits``); :func:`find_tokenizer` finds
its ``tokenizer.json`` in the directory it came from (``config._name_or_path``). Which text is
scored is the evaluator's business (evaluator ``perplexity`` of the bundled zoo).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from slimtorch.core.errors import UnsupportedModelError, UserInputError
from slimtorch.eval.quality import Quality

MAX_CONTEXT = 2048
BATCH = 8


LOGIT_BUDGET = 1 << 27  # logit elements per float64 chunk / per batch of windows (1 GiB)


def window_nll(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Summed next-token NLL (float64) of ``ids [B, L]`` under ``logits [B, L, V]``, in row
    chunks (a float64 copy of a large vocabulary's logits at once would take gigabytes)."""
    pred = logits[:, :-1].reshape(-1, logits.shape[-1])
    target = ids[:, 1:].reshape(-1)
    rows = max(1, LOGIT_BUDGET // logits.shape[-1])
    total = torch.zeros((), dtype=torch.float64, device=logits.device)
    for a in range(0, pred.shape[0], rows):
        total += F.cross_entropy(pred[a : a + rows].double(), target[a : a + rows], reduction="sum")
    return total


def _logits(output: Any) -> torch.Tensor:
    logits = getattr(output, "logits", None)
    if logits is None:
        logits = output[0] if isinstance(output, (tuple, list)) else output
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3:
        raise UnsupportedModelError(
            "perplexity needs a causal LM returning logits [batch, tokens, vocab] (e.g. a"
            " transformers *ForCausalLM); this model returns something else"
        )
    return logits


@torch.no_grad()
def perplexity_of_ids(
    model: nn.Module, ids: torch.Tensor, context: int, device: str = "cpu", batch: int = BATCH
) -> tuple[float, int]:
    """``(mean token NLL in nats, tokens scored)`` over non-overlapping ``context`` windows."""
    if context < 2:
        raise UserInputError(f"the perplexity context must be >= 2 tokens, got {context}")
    n = ids.numel() // context
    if n == 0:
        raise UserInputError(
            f"the held-out text has {ids.numel()} tokens, fewer than one window of {context};"
            " give more text"
        )
    windows = ids[: n * context].reshape(n, context)
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if isinstance(vocab, int) and vocab > 0:  # keep one batch's logits near LOGIT_BUDGET
        batch = max(1, min(batch, LOGIT_BUDGET // (context * vocab)))
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64)
    try:
        for start in range(0, n, batch):
            chunk = windows[start : start + batch].to(device)
            total += window_nll(_logits(model(chunk)).float(), chunk).cpu()
    finally:
        model.train(was_training)
    tokens = n * (context - 1)
    return float(total) / tokens, tokens


def model_context(model: nn.Module, cap: int = MAX_CONTEXT) -> int:
    """The model's context length (``config.max_position_embeddings``, else ``n_positions``)."""
    config = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 1:
            return min(value, cap)
    return cap


def find_tokenizer(model: nn.Module) -> Path:
    """``tokenizer.json`` of the directory the model was loaded from."""
    config = getattr(model, "config", None)
    where = getattr(config, "_name_or_path", None) or getattr(config, "name_or_path", None)
    path = Path(str(where)) / "tokenizer.json" if where else None
    if path is None or not path.is_file():
        raise UserInputError(
            f"perplexity needs the model's tokenizer: no tokenizer.json in {where!r}; load the"
            " model from a Hugging Face directory that holds tokenizer.json (or builtin:austen-lm)"
        )
    return path


def perplexity_quality(nll: float, tokens: int, extra: dict[str, float] | None = None) -> Quality:
    """The ``Quality`` for a mean NLL: metric ``perplexity``, lower is better."""
    more = {"nll": nll, "tokens": float(tokens), **(extra or {})}
    return Quality("perplexity", math.exp(nll), higher_is_better=False, extra=more)
