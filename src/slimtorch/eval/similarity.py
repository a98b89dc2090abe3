"""Similarity maths for sentence encoders: correlations with human judgements, pair scores.

The evaluator ``lee`` of the bundled zoo correlates the cosine similarity of every pair of the
Lee documents with human scores through these functions.
"""

from __future__ import annotations

import numpy as np
import torch


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
