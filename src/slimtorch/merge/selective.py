"""Merges that choose how much of each fine-tune to keep, as mergekit 0.1.5 computes them.

- :func:`model_stock`: Model Stock (Jang et al. 2024): the average of the fine-tunes pulled
  toward the base by ``t = k cos / (1 + (k - 1) cos)``, ``cos`` the mean pairwise cosine of their
  deltas (over the whole tensor, or per row with ``filter_wise``).
- :func:`sce`: SCE (Wan et al. 2024): Select the ``select_topk`` share of elements with the
  largest variance across the deltas, Calculate per-model weights from the deltas' mean squares,
  Erase the minority signs (TIES election), then the weighted disjoint mean.
- :func:`arcee_fusion`: keep a fine-tune's change only where its importance (``|delta|`` times
  the KL divergence of the softmaxed rows) is above ``median + 1.5 IQR``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

QUANTILE_SAMPLE = 1_000_000  # arcee_fusion: quantiles from a sample above this many elements


def model_stock(
    base: torch.Tensor, tensors: Sequence[torch.Tensor], filter_wise: bool = False
) -> torch.Tensor:
    """Model Stock of ``tensors`` (two or more fine-tunes) around ``base``."""
    if len(tensors) < 2:
        raise ValueError(f"model_stock needs at least two fine-tuned models, got {len(tensors)}")
    w0, ws = base, list(tensors)
    if filter_wise:
        if w0.dim() == 1:
            w0, ws = w0.unsqueeze(0), [w.unsqueeze(0) for w in ws]
    else:
        w0, ws = w0.reshape(-1), [w.reshape(-1) for w in ws]
    offsets = [w - w0 for w in ws]
    cosines = []
    for i, a in enumerate(offsets):
        for b in offsets[i + 1 :]:
            norms = torch.norm(a, dim=-1) * torch.norm(b, dim=-1)
            cosines.append(((a * b).sum(dim=-1) / norms.clamp(min=1e-6)).clamp(-1, 1))
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    k = len(ws)
    denominator = 1 + (k - 1) * cos
    singular = denominator.abs() < 1e-6  # no finite estimate: keep the base there
    safe = torch.where(singular, torch.ones_like(denominator), denominator)
    t = torch.where(singular, torch.zeros_like(cos), (k * cos) / safe)
    average = sum(ws) / k
    return (t * average + (1 - t) * w0).reshape(base.shape)  # type: ignore[no-any-return]


def sce_mask(deltas: torch.Tensor, density: float) -> torch.Tensor:
    """1 on the ``int(nonzero * density)`` elements of largest variance across ``deltas``."""
    if density <= 0:
        return torch.zeros_like(deltas[0])
    if density >= 1:
        return torch.ones_like(deltas[0])
    var = torch.var(deltas, dim=0, unbiased=False)
    k = int(torch.count_nonzero(var) * density)
    if k == 0:
        return torch.zeros_like(var)
    _, idx = torch.topk(var.abs().view(-1), k=k, largest=True)
    mask = torch.zeros_like(var)
    mask.view(-1)[idx] = 1
    return mask


def sce_weights(deltas: torch.Tensor) -> torch.Tensor:
    """Each model's mean squared delta as a share of the sum (equal shares for a zero sum)."""
    w = deltas.square().reshape(deltas.shape[0], -1).mean(dim=1)
    total = torch.sum(w).item()
    if abs(total) < 1e-6:
        return torch.ones_like(w) / w.shape[0]
    return w / total


def sce(
    base: torch.Tensor, tensors: Sequence[torch.Tensor], select_topk: float = 1.0
) -> torch.Tensor:
    """SCE merge of the fine-tunes ``tensors`` into ``base``."""
    if not tensors:
        return base
    deltas = torch.stack([t - base for t in tensors], dim=0)
    if select_topk < 1:
        deltas = deltas * sce_mask(deltas, select_topk).unsqueeze(0)
    majority = (deltas.sum(dim=0) >= 0).to(deltas.dtype) * 2 - 1
    keep = deltas.sign() == majority
    w = sce_weights(deltas)
    while w.dim() < deltas.dim():
        w = w.unsqueeze(-1)
    kept = w * keep
    merged = (deltas * kept).sum(dim=0)
    return base + merged / torch.sum(kept, dim=0).clamp(min=1e-6)


def _quantiles(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    flat = x.reshape(-1)
    if flat.numel() > QUANTILE_SAMPLE:  # a sample with replacement, as mergekit
        idx = torch.randint(flat.numel(), (QUANTILE_SAMPLE,), generator=generator)
        flat = flat[idx.to(flat.device)]
    ordered, _ = torch.sort(flat)
    q = torch.tensor([0.25, 0.5, 0.75])
    return ordered[(q.to(ordered.device) * (ordered.numel() - 1)).long()]


def fusion_importance(tuned: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """``|tuned - base|`` times the KL divergence of the softmaxed last dimension."""
    p = F.softmax(tuned, dim=-1) + 1e-8
    q = F.softmax(base, dim=-1) + 1e-8
    kl = torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
    return (tuned - base).abs() * kl


def arcee_fusion(
    base: torch.Tensor, tuned: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """``base + (tuned - base) * [importance >= median + 1.5 IQR]`` (the mask is float32).

    Deterministic up to ``QUANTILE_SAMPLE`` elements; above, the quantiles come from a random
    sample drawn with ``generator``.
    """
    importance = fusion_importance(tuned, base)
    q1, median, q3 = _quantiles(importance, generator)
    mask = (importance >= median + 1.5 * (q3 - q1)).float()
    return base + (tuned - base) * mask
