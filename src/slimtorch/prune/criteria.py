"""Unstructured pruning criteria: pure functions from weights to boolean keep-masks.

Every function returns a ``bool`` tensor shaped like the weight, ``True`` where the weight is
kept. ``prior`` (optional, same shape) is an existing keep-mask: entries it already prunes are
ranked below every other weight, so pruning again to a higher sparsity gives exactly the
requested count, and the result is always ``new AND prior``.

Counts are exact where the docstring says so: ``round(sparsity * numel)`` weights are pruned,
with ties broken deterministically by position (earlier flat index pruned first).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from slimtorch.core.errors import ConfigError


def num_pruned(numel: int, sparsity: float) -> int:
    """How many of ``numel`` weights a ``sparsity`` fraction prunes: ``round(sparsity * numel)``."""
    if not 0.0 <= sparsity <= 1.0:
        raise ConfigError(f"sparsity must be in [0, 1], got {sparsity}; pick e.g. 0.5")
    return min(numel, max(0, round(sparsity * numel)))


def lowest_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Keep-mask pruning exactly the ``k`` lowest ``scores`` (ties: lower flat index first).

    Uses ``kthvalue`` plus an index-ordered pass over the tied values, so no full sort (and no
    int64 copy of the whole tensor) is needed on large embeddings.
    """
    flat = scores.reshape(-1)
    n = flat.numel()
    if k <= 0:
        return torch.ones_like(scores, dtype=torch.bool)
    if k >= n:
        return torch.zeros_like(scores, dtype=torch.bool)
    thr = flat.kthvalue(k).values
    prune = flat < thr
    need = k - int(prune.sum())
    if need > 0:
        tied = torch.nonzero(flat == thr).flatten()[:need]
        prune[tied] = True
    return (~prune).reshape(scores.shape)


def _magnitude_scores(w: torch.Tensor, prior: torch.Tensor | None) -> torch.Tensor:
    """``|w|`` in float32, with entries ``prior`` already prunes ranked lowest (-1)."""
    scores = w.detach().abs().to(torch.float32)
    if prior is not None:
        scores = scores.masked_fill(~prior.to(torch.bool), -1.0)
    return scores


def _and(mask: torch.Tensor, prior: torch.Tensor | None) -> torch.Tensor:
    return mask if prior is None else mask & prior.to(device=mask.device, dtype=torch.bool)


def magnitude_mask(
    w: torch.Tensor, sparsity: float, prior: torch.Tensor | None = None
) -> torch.Tensor:
    """Prune exactly ``round(sparsity * numel)`` smallest ``|w|`` (ties by position)."""
    k = num_pruned(w.numel(), sparsity)
    return _and(lowest_k_mask(_magnitude_scores(w, prior), k), prior)


def global_magnitude_masks(
    weights: Sequence[torch.Tensor],
    sparsity: float,
    priors: Sequence[torch.Tensor | None] | None = None,
) -> list[torch.Tensor]:
    """One magnitude threshold across all ``weights``, pruning exactly ``round(sparsity * total)``.

    Layers end up with different sparsities (small-magnitude layers lose more). Memory: one
    float32 copy of all ``|w|`` concatenated, e.g. 48 MB for a 12M-element embedding.
    """
    if not weights:
        return []
    pri = list(priors) if priors is not None else [None] * len(weights)
    if len(pri) != len(weights):
        raise ValueError(f"got {len(weights)} weights but {len(pri)} priors")
    device = weights[0].device
    scores = torch.cat(
        [_magnitude_scores(w, p).reshape(-1).to(device) for w, p in zip(weights, pri)]
    )
    total = scores.numel()
    keep = lowest_k_mask(scores, num_pruned(total, sparsity))
    del scores
    out: list[torch.Tensor] = []
    offset = 0
    for w, p in zip(weights, pri):
        part = keep[offset : offset + w.numel()].reshape(w.shape).to(w.device)
        out.append(_and(part, p))
        offset += w.numel()
    return out


def threshold_mask(
    w: torch.Tensor,
    value: float | None = None,
    std_k: float | None = None,
    prior: torch.Tensor | None = None,
) -> torch.Tensor:
    """Prune ``|w| < value``, or ``|w| < std_k * w.std()`` (give exactly one of the two).

    ``w.std()`` is the (unbiased) standard deviation of the weight as it is now, zeros included.
    """
    if (value is None) == (std_k is None):
        raise ConfigError(
            "threshold pruning needs exactly one of `value` or `std_k`"
            f" (got value={value}, std_k={std_k})"
        )
    a = w.detach().abs().to(torch.float32)
    if value is not None:
        thr = torch.tensor(float(value))
    else:
        assert std_k is not None
        thr = (
            float(std_k) * w.detach().to(torch.float32).std()
            if w.numel() > 1
            else torch.tensor(0.0)
        )
    return _and(a >= thr.to(a.device), prior)


def random_mask(
    w: torch.Tensor,
    rate: float,
    generator: torch.Generator | None = None,
    prior: torch.Tensor | None = None,
) -> torch.Tensor:
    """Prune each weight independently with probability ``rate`` (count is approximate)."""
    if not 0.0 <= rate <= 1.0:
        raise ConfigError(f"random pruning rate must be in [0, 1], got {rate}")
    u = torch.rand(w.shape, generator=generator)
    return _and((u >= rate).to(w.device), prior)


def probabilistic_mask(
    w: torch.Tensor,
    sparsity: float,
    generator: torch.Generator | None = None,
    power: float = 1.0,
    prior: torch.Tensor | None = None,
) -> torch.Tensor:
    """Keep exactly ``numel - round(sparsity * numel)`` weights, sampled without replacement
    with probability proportional to ``|w| ** power`` (Gumbel top-k).

    Key of weight i: ``power * log|w_i| - log(E_i)``, ``E_i ~ Exp(1)``; the ``k`` largest keys are a
    sample without replacement with weights ``|w|**power``. ``power=0`` samples uniformly. Zero
    (or ``prior``-pruned) weights are kept only when fewer non-zeros than ``k`` exist.
    """
    if power < 0:
        raise ConfigError(f"`power` must be >= 0, got {power}")
    k_prune = num_pruned(w.numel(), sparsity)
    e = torch.empty(w.shape, dtype=torch.float64).exponential_(generator=generator)
    noise = -torch.log(e.clamp_min(1e-300))
    a = w.detach().abs().to(torch.float64).cpu()
    if prior is not None:
        a = a.masked_fill(~prior.to(torch.bool).cpu(), 0.0)
    if power == 0:
        base = torch.where(a > 0, torch.zeros_like(a), torch.full_like(a, -torch.inf))
    else:
        base = power * torch.log(a)
    keys = base + noise  # noise is finite, so -inf (zero weights) stays lowest
    return _and(lowest_k_mask(keys, k_prune).to(w.device), prior)
