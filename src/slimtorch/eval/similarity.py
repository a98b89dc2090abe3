"""Evaluator ``lee``: document similarity of a sentence encoder against human judgements.

The 50 Lee & Pincombe news documents are embedded (mean pooling + L2 norm, see
:func:`slimtorch.zoo.minilm.embed`); the cosine similarity of every pair (1,225 pairs, the
upper triangle) is correlated with the human scores. Headline: Pearson (0.656 for the fp32
all-MiniLM-L6-v2). Extras: Spearman, and the mean cosine between this model's document
embeddings and those of the fp32 pretrained MiniLM (1.0 = unchanged).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np
import torch
from torch import nn

from slimtorch.core.context import Context
from slimtorch.core.errors import UserInputError
from slimtorch.eval.quality import EVALUATORS, Quality


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation of two equal-length 1-D arrays (0.0 if either is constant)."""
    xc = np.asarray(x, dtype=np.float64) - np.mean(x)
    yc = np.asarray(y, dtype=np.float64) - np.mean(y)
    denom = float(np.sqrt((xc**2).sum() * (yc**2).sum()))
    return float((xc * yc).sum() / denom) if denom > 0 else 0.0


def average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n of ``x``; tied values share the mean of their ranks."""
    x = np.asarray(x)
    order = np.argsort(x, kind="stable")
    sorted_x = x[order]
    # Group boundaries of equal values in sorted order.
    starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])
    ends = np.r_[starts[1:], len(x)]
    ranks = np.empty(len(x), dtype=np.float64)
    for s, e in zip(starts, ends):
        ranks[order[s:e]] = (s + 1 + e) / 2.0
    return ranks


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman rank correlation (Pearson of average ranks)."""
    return pearson(average_ranks(x), average_ranks(y))


def pair_scores(embeddings: torch.Tensor, human: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cosine similarities and human scores of every pair ``i < j`` (the upper triangle)."""
    emb = torch.nn.functional.normalize(embeddings.double(), dim=-1)
    sims = (emb @ emb.T).numpy()
    iu = np.triu_indices(len(human), k=1)
    return sims[iu], np.asarray(human, dtype=np.float64)[iu]


def mean_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean row-wise cosine similarity of two ``[N, D]`` embedding matrices."""
    return float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1).mean())


@lru_cache(maxsize=1)
def reference_embeddings() -> torch.Tensor:
    """Lee-document embeddings of the fp32 pretrained MiniLM (computed once per process)."""
    from slimtorch.zoo import data_text, minilm

    docs, _ = data_text.load_lee()
    return minilm.embed(minilm.build(True).float(), docs)


def lee_quality(embeddings: torch.Tensor, human: np.ndarray) -> Quality:
    """Quality of ``embeddings`` of the 50 Lee documents against the ``human`` matrix."""
    if embeddings.shape[0] != len(human):
        raise UserInputError(
            f"got {embeddings.shape[0]} embeddings for {len(human)} Lee documents; embed them all"
        )
    sims, scores = pair_scores(embeddings, human)
    extra = {"lee_spearman": spearman(sims, scores)}
    ref = reference_embeddings()
    if ref.shape == embeddings.shape:
        extra["embedding_cosine"] = mean_cosine(embeddings, ref)
    return Quality("lee_pearson", pearson(sims, scores), higher_is_better=True, extra=extra)


def evaluate_lee(model: nn.Module, ctx: Context, data: Any) -> Quality:
    """Evaluator ``lee``: ``model`` is a BertModel-like encoder using the MiniLM tokenizer."""
    if data not in (None, "builtin:lee"):
        raise UserInputError(
            f"evaluator 'lee' runs on builtin:lee only, got data={data!r}; drop --data or pass"
            " builtin:lee"
        )
    from slimtorch.zoo import data_text, minilm

    docs, human = data_text.load_lee()
    return lee_quality(minilm.embed(model, docs), human)


EVALUATORS.add("lee", evaluate_lee)
