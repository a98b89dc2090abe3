"""Quality of a quantized KV cache: a teacher-forced run that reads its past through the cache.

A cache only matters where the model decodes with ``past_key_values``: a single forward pass
over a whole window never reads a cache. So each token window ``[L]`` is fed as generation
would: the first ``prefill`` tokens in one forward pass (a prompt: they attend to each other
exactly, and fill the cache), then the rest ``chunk`` tokens at a time with the cache, each chunk
attending to the cached past (dequantized where the cache quantized it, exact in its window)
and to itself exactly. ``chunk=1`` is exactly token-by-token decoding; larger chunks are faster
and give each chunk's later tokens a few exact neighbours more.

The reference is the same feed through transformers' float ``DynamicCache`` (numerically the
plain forward pass). Only the positions fed after the prefill are scored (the prefill's own
logits never read the cache): perplexity of the next token and the KL divergence of the
next-token distribution from the reference model's (:mod:`slimtorch.eval.divergence`), whose
model may differ (e.g. a 4-bit artifact with a quantized cache against the float original with
a float cache).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimtorch.calibrate.text import TOKEN_WINDOWS
from slimtorch.core.errors import UserInputError
from slimtorch.eval.divergence import DivergenceStats, token_kld, token_nll, top1_agrees

PREFILL = 512
CHUNK = 32


def new_cache(model: nn.Module, kv: Any | None) -> Any:
    """A fresh cache for ``model``: :class:`~slimtorch.runtime.kv_cache.QuantizedKVCache` with
    ``kv`` (a ``KVQuantConfig``), or transformers' ``DynamicCache`` when ``kv`` is None."""
    config: Any = getattr(model, "config", None)
    if kv is None:
        from transformers import DynamicCache

        return DynamicCache(config=config)
    from slimtorch.runtime.kv_cache import QuantizedKVCache

    return QuantizedKVCache(config, kv)


def fed_logits(
    model: nn.Module, ids: torch.Tensor, cache: Any, prefill: int, chunk: int
) -> Iterator[tuple[int, torch.Tensor]]:
    """``(start, logits [B, n, V])`` of every piece of ``ids [B, L]`` fed through ``cache``: the
    prefill ``ids[:, :prefill]`` first (start 0), then ``chunk`` tokens at a time."""
    bounds = [0, prefill, *range(prefill + chunk, ids.shape[1], chunk), ids.shape[1]]
    for a, b in itertools.pairwise(bounds):
        out = model(input_ids=ids[:, a:b], cache=cache, use_cache=True)
        yield a, out.logits


Pieces = list[tuple[int, torch.Tensor]]


@torch.no_grad()
def scored_pieces(
    model: nn.Module, ids: torch.Tensor, kv: Any | None, feed: tuple[int, int]
) -> tuple[Pieces, float]:
    """Feed ``ids [B, L]`` through ``model`` with a fresh cache of ``kv`` (``feed = (prefill,
    chunk)``): the logits of the scored positions, as ``(start, logits [B, n, V])`` pieces
    (positions ``start .. start+n-1``, all after the prefill, each with a next token), and the
    bytes per token the cache held at the end."""
    from slimtorch.runtime.kv_cache import cache_bytes_per_token

    cache, pieces = new_cache(model, kv), []
    for a, logits in fed_logits(model, ids, cache, *feed):
        n = min(logits.shape[1], ids.shape[1] - 1 - a)
        if a >= feed[0] and n > 0:
            pieces.append((a, logits[:, :n]))
    return pieces, cache_bytes_per_token(cache)


def score_pieces(
    stats: DivergenceStats, base: Pieces, pieces: Pieces, ids: torch.Tensor
) -> DivergenceStats:
    """Add the positions of ``pieces`` (and the same positions of ``base``: the reference)
    predicting the next tokens of ``ids [B, L]`` to ``stats``."""
    for (a, base_logits), (b, logits) in zip(base, pieces, strict=True):
        if a != b or base_logits.shape != logits.shape:
            raise UserInputError("both runs must be fed the same windows with the same feed")
        targets = ids[:, a + 1 : a + 1 + logits.shape[1]].to(logits.device)
        stats.kld.append(token_kld(base_logits, logits).cpu())
        stats.agree += int(top1_agrees(base_logits, logits).sum())
        stats.nll += float(token_nll(logits, targets).sum())
        stats.base_nll += float(token_nll(base_logits, targets).sum())
    return stats


def check_feed(length: int, prefill: int, chunk: int) -> None:
    """Raise unless windows of ``length`` tokens leave positions to score after ``prefill``."""
    if chunk < 1:
        raise UserInputError(f"the cache feed chunk must be >= 1 token, not {chunk}")
    if not 1 <= prefill < length - 1:
        raise UserInputError(
            f"the prefill ({prefill} tokens) must be >= 1 and leave positions to score in a"
            f" window of {length} tokens: give a smaller prefill or longer windows"
        )


@torch.no_grad()
def compare_cached(
    model: nn.Module,
    base: nn.Module,
    windows: torch.Tensor,
    kv: Any | None,
    feed: tuple[int, int] = (PREFILL, CHUNK),
    stats: DivergenceStats | None = None,
) -> tuple[DivergenceStats, float]:
    """Feed token ``windows [N, L]`` (one at a time) through ``model`` with a cache of ``kv``
    (None: the float cache) and through ``base`` with the float cache, ``feed = (prefill,
    chunk)``, scoring positions ``prefill .. L-2``. Returns the stats (accumulated into
    ``stats`` if given) and the mean bytes per token ``model``'s cache held at the end of a
    window."""
    check_feed(windows.shape[1], *feed)
    stats = stats if stats is not None else DivergenceStats()
    device = next(model.parameters()).device
    modes = (model.training, base.training)
    model.eval()
    base.eval()
    per_token = []
    try:
        for row in windows:
            ids = row[None].to(device)
            reference, _ = scored_pieces(base, ids, None, feed)
            pieces, held = scored_pieces(model, ids, kv, feed)
            score_pieces(stats, reference, pieces, ids)
            per_token.append(held)
    finally:
        model.train(modes[0])
        base.train(modes[1])
    return stats, sum(per_token) / len(per_token)


def kv_suite(
    model: nn.Module, tokenizer: Path, kv: Any, suite: tuple[int, int], texts: tuple[str, ...]
) -> dict[str, Any]:
    """The quantized cache's figures on ``model`` alone (its float cache is the reference):
    ``suite`` = (windows per text, tokens per window) of the held-out split of each of
    ``texts``, fed with a prefill of a quarter of the window then :data:`CHUNK` tokens at a
    time. Returns the cache's settings, ``bytes_per_token`` it held at the end of a window
    against ``fp_bytes_per_token``, and ``perplexity``, ``baseline_perplexity`` (float cache),
    ``kld_mean``, ``kld_p99``, ``top1_agreement``, ``positions``."""
    from slimtorch.runtime.kv_cache import fp_bytes_per_token

    n, length = suite
    feed = (max(1, length // 4), CHUNK)
    check_feed(length, *feed)
    stats, held = DivergenceStats(), []
    for text in texts:
        windows = TOKEN_WINDOWS.get("heldout")(text, tokenizer, n, length)
        _, per_token = compare_cached(model, model, windows, kv, feed, stats)
        held.append(per_token)
    dtype = next(model.parameters()).dtype
    return {
        "bits": kv.bits,
        "group": kv.group,
        "window": kv.window,
        "prefill": feed[0],
        "chunk": feed[1],
        "window_tokens": length,
        "bytes_per_token": sum(held) / len(held),
        "fp_bytes_per_token": fp_bytes_per_token(getattr(model, "config", None), dtype),
        **stats.summary(),
    }
