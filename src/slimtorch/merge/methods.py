"""The maths of model merging: pure functions over same-shaped tensors, one tensor name at a time.

The semantics follow mergekit 0.1.5 operation for operation, so that deterministic merges give
identical tensors:

- :func:`linear`: ``sum(w_i * x_i)`` (divided by ``sum(w_i)`` when ``normalize``), computed in
  float32 (float64 for float64 inputs) and cast back to the input dtype.
- :func:`slerp`: spherical interpolation of the whole tensor from ``v0`` (``t = 0``) to ``v1``
  (``t = 1``), falling back to linear interpolation when ``|cos| > 0.9995``.
- :func:`task_merge`: the generalized task arithmetic behind ``task_arithmetic``, ``ties``,
  ``dare_linear`` and ``dare_ties``: deltas ``m_i - base`` are sparsified (top-|delta| for TIES,
  random keep with probability ``density`` for DARE), multiplied by their weights, optionally
  masked to the elected sign (the sign of the summed weighted deltas), summed, divided by the
  summed weights where kept when ``normalize``, scaled by ``lam`` and added to the base.

DARE's rescaling is mergekit's by default (``"l1"``: the kept delta is scaled to the L1 norm of the
full delta); ``"density"`` divides by ``density`` as in the DARE paper.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

Sparsify = Literal["magnitude", "random", "della"]
Rescale = Literal["l1", "density"]

SLERP_DOT_THRESHOLD = 0.9995
_CHUNK = 1024 * 1024  # elements per chunk of slerp's float32 scratch (mergekit's bound)


def _check_inputs(tensors: Sequence[torch.Tensor], what: str) -> None:
    if not tensors:
        raise ValueError(f"{what} needs at least one tensor")
    first = tensors[0]
    for t in tensors[1:]:
        if t.shape != first.shape:
            raise ValueError(f"{what}: shapes differ ({tuple(first.shape)} vs {tuple(t.shape)})")
    if not all(t.is_floating_point() for t in tensors):
        raise TypeError(f"{what} merges floating-point tensors only")


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def linear(
    tensors: Sequence[torch.Tensor], weights: Sequence[float], normalize: bool = True
) -> torch.Tensor:
    """Weighted sum of ``tensors`` (weighted average when ``normalize``), in the input dtype."""
    _check_inputs(tensors, "linear merge")
    if len(weights) != len(tensors):
        raise ValueError(f"linear merge: {len(tensors)} tensors but {len(weights)} weights")
    first = tensors[0]
    dtype = _compute_dtype(first)
    w = torch.tensor(list(weights), dtype=dtype)
    coef_shape = (1,) * first.dim()
    result = torch.zeros(first.shape, dtype=dtype)
    for tensor, coef in zip(tensors, w.unbind(0), strict=True):
        result.addcmul_(tensor, coef.reshape(coef_shape))
    if normalize:
        result.div_(w.sum())
    return result.to(first.dtype)


def _chunked_norm(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    parts = [
        torch.linalg.vector_norm(x[:, s : s + _CHUNK].to(dtype), dim=1, keepdim=True)
        for s in range(0, x.shape[1], _CHUNK)
    ]
    return torch.linalg.vector_norm(torch.stack(parts), dim=0)


def slerp(
    t: float,
    v0: torch.Tensor,
    v1: torch.Tensor,
    dot_threshold: float = SLERP_DOT_THRESHOLD,
    eps: float = 1e-8,
) -> torch.Tensor:
    """Spherical interpolation between ``v0`` (t=0) and ``v1`` (t=1), treated as flat vectors.

    Nearly colinear or antipodal pairs (``|cos| > dot_threshold``) interpolate linearly.
    """
    _check_inputs([v0, v1], "slerp")
    dtype = _compute_dtype(v0)
    a, b = v0.reshape(1, -1), v1.reshape(1, -1)
    tt = torch.tensor([t], dtype=dtype).reshape(-1, 1)
    if a.shape[1] == 0:
        return ((1 - tt) * a + tt * b).reshape(v0.shape).to(v0.dtype)
    norm_a, norm_b = _chunked_norm(a, dtype), _chunked_norm(b, dtype)
    norm_a = torch.where(norm_a > eps, norm_a, 1)
    norm_b = torch.where(norm_b > eps, norm_b, 1)
    dots = [
        (a[:, s : s + _CHUNK].to(dtype) / norm_a * (b[:, s : s + _CHUNK].to(dtype) / norm_b)).sum(
            dim=1, keepdim=True
        )
        for s in range(0, a.shape[1], _CHUNK)
    ]
    dot = torch.stack(dots).sum(dim=0).clamp(-1, 1)
    colinear = dot.abs() > dot_threshold
    theta = torch.acos(torch.where(colinear, 0, dot))
    sin_theta = torch.sin(theta)
    coef_a = torch.where(colinear, 1 - tt, torch.sin((1 - tt) * theta) / sin_theta)
    coef_b = torch.where(colinear, tt, torch.sin(tt * theta) / sin_theta)
    result = torch.empty_like(a)
    for s in range(0, a.shape[1], _CHUNK):
        x, y = a[:, s : s + _CHUNK].to(dtype), b[:, s : s + _CHUNK].to(dtype)
        result[:, s : s + _CHUNK] = coef_a * x + coef_b * y
    return result.reshape(v0.shape)


def rescale_masked(
    tensor: torch.Tensor, mask: torch.Tensor, rescale: Rescale | None, density: float
) -> torch.Tensor:
    """``tensor * mask``, rescaled to the L1 norm of ``tensor`` (``"l1"``) or by ``1/density``."""
    masked = tensor * mask
    if rescale is None:
        return masked
    if rescale == "density":
        return masked / density if density > 0 else torch.zeros_like(masked)
    before, after = tensor.abs().sum(), masked.abs().sum()
    if before < 1e-7 or after < 1e-7:
        return masked
    return masked * (before / after)


def magnitude_sparsify(
    delta: torch.Tensor, density: float, rescale: Rescale | None = None
) -> torch.Tensor:
    """Keep the ``max(1, int(density * numel))`` largest-|delta| entries (TIES trimming)."""
    if density >= 1:
        return delta
    if density <= 0 or delta.numel() == 0:
        return torch.zeros_like(delta)
    k = max(1, int(density * delta.numel()))
    mask = torch.zeros(delta.numel(), dtype=delta.dtype, device=delta.device)
    magnitude = delta.abs().reshape(-1)
    if magnitude.device.type == "cpu":
        magnitude = magnitude.float()
    mask[torch.argsort(magnitude, descending=True)[:k]] = 1
    return rescale_masked(delta, mask.reshape_as(delta), rescale, density)


def random_sparsify(
    delta: torch.Tensor,
    density: float,
    generator: torch.Generator | None,
    rescale: Rescale | None = "l1",
) -> torch.Tensor:
    """Keep each entry with probability ``density`` (DARE's drop), then rescale."""
    if density >= 1:
        return delta
    work = delta.dtype if delta.dtype == torch.bfloat16 else torch.float32
    keep = torch.full_like(delta, density, dtype=work)
    mask = torch.bernoulli(keep, generator=generator)
    return rescale_masked(delta.to(work), mask, rescale, density).to(delta.dtype)


def della_magprune(
    delta: torch.Tensor,
    density: float,
    epsilon: float,
    generator: torch.Generator | None,
    rescale: Rescale | None = "l1",
) -> torch.Tensor:
    """DELLA's MagPrune: keep entry with probability ``density - eps .. density + eps`` by rank.

    Ranks of ``|delta|`` within each row (a 1-D tensor is one row), lowest magnitude kept with
    probability ``density - epsilon``, highest with ``density + epsilon``; then rescaled.
    """
    if density >= 1:
        return delta
    if density <= 0:
        return torch.zeros_like(delta)
    if density + epsilon >= 1 or density - epsilon <= 0:
        raise ValueError(
            f"della: density {density} +/- epsilon {epsilon} must stay inside (0, 1); lower epsilon"
        )
    work = delta.dtype if delta.dtype == torch.bfloat16 else torch.float32
    rows = delta.unsqueeze(0) if delta.dim() < 2 else delta
    ranks = torch.argsort(rows.abs(), dim=1, descending=False).argsort(dim=1).to(work) + 1
    lo, hi = ranks.min(dim=1, keepdim=True).values, ranks.max(dim=1, keepdim=True).values
    # one element per row: mergekit divides 0 by 0 and torch.bernoulli fails; keep it at density
    rank_norm = torch.nan_to_num(((ranks - lo) / (hi - lo)).clamp(0, 1), nan=0.5)
    probs = (density - epsilon) + rank_norm * 2 * epsilon
    mask = torch.bernoulli(probs, generator=generator).to(work)
    out = rescale_masked(rows.to(work), mask, rescale, density)
    return out.to(delta.dtype).reshape(delta.shape)


def sign_consensus(deltas: torch.Tensor) -> torch.Tensor:
    """TIES sign election: True where a delta's sign equals the sign of the summed deltas.

    ``deltas`` is stacked ``[models, ...]``; a zero sum elects ``+``, zero deltas never agree.
    """
    sign = deltas.sign()
    majority = (deltas.sum(dim=0) >= 0).to(deltas.dtype) * 2 - 1
    return sign == majority


@dataclass(frozen=True)
class TaskMergeOptions:
    """How :func:`task_merge` combines task vectors (defaults: plain task arithmetic)."""

    sparsify: Sparsify | None = None
    consensus: bool = False
    normalize: bool = False
    rescale: Rescale | None = None
    lam: float = 1.0


TASK_ARITHMETIC = TaskMergeOptions()
TIES = TaskMergeOptions(sparsify="magnitude", consensus=True, normalize=True)
DARE_LINEAR = TaskMergeOptions(sparsify="random", rescale="l1")
DARE_TIES = TaskMergeOptions(sparsify="random", consensus=True, rescale="l1")
DELLA = TaskMergeOptions(sparsify="della", consensus=True, normalize=True, rescale="l1")
DELLA_LINEAR = TaskMergeOptions(sparsify="della", rescale="l1")


def task_merge(
    base: torch.Tensor,
    others: Sequence[torch.Tensor],
    weights: Sequence[float],
    densities: Sequence[float],
    options: TaskMergeOptions = TASK_ARITHMETIC,
    generator: torch.Generator | None = None,
    epsilons: Sequence[float] | None = None,
) -> torch.Tensor:
    """``base + lam * merge(w_i * sparsify(m_i - base))``: task arithmetic, TIES, DARE, DELLA.

    ``epsilons``: DELLA's per-model probability spread (default 0.15 each).
    """
    _check_inputs([base, *others], "task merge")
    if not (len(weights) == len(densities) == len(others)):
        raise ValueError(
            f"task merge: {len(others)} models, {len(weights)} weights, {len(densities)} densities"
        )
    if not others:
        return base
    deltas = base.new_empty((len(others), *base.shape))
    eps = list(epsilons) if epsilons is not None else [0.15] * len(others)
    for i, (model, density) in enumerate(zip(others, densities, strict=True)):
        delta = model - base
        if options.sparsify == "della":
            delta = della_magprune(delta, density, eps[i], generator, options.rescale)
        elif options.sparsify == "magnitude":
            delta = magnitude_sparsify(delta, density, options.rescale)
        elif options.sparsify == "random":
            delta = random_sparsify(delta, density, generator, options.rescale)
        deltas[i] = delta
    w = torch.tensor(list(weights), dtype=deltas.dtype, device=deltas.device)
    while w.dim() < deltas.dim():
        w.unsqueeze_(-1)
    deltas.mul_(w)
    if options.consensus:
        mask = sign_consensus(deltas)
        mixed = (deltas * mask).sum(dim=0)
        divisor = (w * mask).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed = deltas.sum(dim=0)
        divisor = w.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    if options.normalize:
        mixed /= divisor
    if options.lam != 1:
        mixed *= options.lam
    return (base + mixed).to(base.dtype)


def _per_model(value: float | Sequence[float], n: int) -> list[float]:
    return [float(value)] * n if isinstance(value, int | float) else [float(v) for v in value]


def task_arithmetic(
    base: torch.Tensor,
    others: Sequence[torch.Tensor],
    weights: Sequence[float],
    normalize: bool = False,
    lam: float = 1.0,
) -> torch.Tensor:
    """``base + lam * sum(w_i (m_i - base))`` (divided by ``sum(w_i)`` when ``normalize``)."""
    options = TaskMergeOptions(normalize=normalize, lam=lam)
    return task_merge(base, others, weights, [1.0] * len(others), options)


def ties(
    base: torch.Tensor,
    others: Sequence[torch.Tensor],
    weights: Sequence[float],
    density: float | Sequence[float],
    normalize: bool = True,
    lam: float = 1.0,
) -> torch.Tensor:
    """TIES: trim each delta to its top ``density`` by magnitude, elect signs, disjoint mean."""
    options = TaskMergeOptions(sparsify="magnitude", consensus=True, normalize=normalize, lam=lam)
    return task_merge(base, others, weights, _per_model(density, len(others)), options)


def dare(
    base: torch.Tensor,
    others: Sequence[torch.Tensor],
    weights: Sequence[float],
    density: float | Sequence[float],
    generator: torch.Generator | None,
    consensus: bool = False,
    rescale: Rescale | None = "l1",
) -> torch.Tensor:
    """DARE: drop delta entries with probability ``1 - density``, rescale, then sum (or TIES)."""
    options = TaskMergeOptions(sparsify="random", consensus=consensus, rescale=rescale)
    return task_merge(base, others, weights, _per_model(density, len(others)), options, generator)


def tensor_generator(seed: int, name: str) -> torch.Generator:
    """A generator for the random choices of tensor ``name``: independent of the merge order."""
    gen = torch.Generator()
    gen.manual_seed((int(seed) * 1_000_003 + zlib.crc32(name.encode("utf-8"))) % (2**63))
    return gen
