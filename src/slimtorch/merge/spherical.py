"""Merges on the hypersphere, operation for operation as mergekit 0.1.5 computes them.

- :func:`nuslerp`: spherical interpolation of two tensors, over the whole tensor (``flatten``),
  per row (``row_wise``) or per column (the last dimension); with a base, of the two deltas.
- :func:`multislerp`: barycentric interpolation of any number of tensors (tangent space at their
  weighted mean direction, exponential map back), rescaled to the weighted mean norm.
- :func:`karcher`: the weighted Karcher (Riemannian) mean of the unit directions by fixed-point
  iteration, rescaled by the weighted norms.

Every function keeps the inputs' dtype where mergekit does, so that merges in bfloat16 or float16
give the same bits.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _unit(x: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    return x / torch.norm(x, dim=-1, keepdim=True).clamp(min=eps)


def nuslerp_pair(
    t: float,
    v0: torch.Tensor,
    v1: torch.Tensor,
    row_wise: bool = False,
    flatten: bool = True,
    eps: float = 1e-8,
) -> torch.Tensor:
    """Slerp from ``v0`` (t=0) to ``v1`` (t=1) over the flat tensor, each row, or each column.

    Pairs with ``1 - cos^2 <= eps^2`` (colinear) interpolate linearly.
    """
    shape = v0.shape
    swap = row_wise and not flatten
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif swap:
        v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)
    cos = torch.sum(_unit(v0) * _unit(v1), dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos.square()) <= eps**2
    theta = torch.acos(torch.where(colinear, 0, cos))
    sin_theta = torch.sin(theta)
    out = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / sin_theta
    out = torch.where(colinear, (1 - t) * v0 + t * v1, out)
    if swap:
        out = out.transpose(0, -1)
    return out.reshape(shape)


def nuslerp(
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    base: torch.Tensor | None = None,
    row_wise: bool = False,
    flatten: bool = True,
) -> torch.Tensor:
    """mergekit's ``nuslerp``: two models, ``t = w_1 / (w_0 + w_1)`` (0.5 for a zero sum)."""
    if len(tensors) != 2 or len(weights) != 2:
        raise ValueError(f"nuslerp merges exactly two models, got {len(tensors)}")
    total = sum(weights)
    t = 0.5 if abs(total) < 1e-6 else weights[1] / total
    if base is None:
        return nuslerp_pair(t, tensors[0], tensors[1], row_wise, flatten)
    return base + nuslerp_pair(t, tensors[0] - base, tensors[1] - base, row_wise, flatten)


def multislerp(
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    base: torch.Tensor | None = None,
    normalize_weights: bool = True,
    eps: float = 1e-8,
) -> torch.Tensor:
    """Barycentric slerp of ``tensors`` (deltas from ``base`` when given) with ``weights``."""
    if len(tensors) != len(weights) or not tensors:
        raise ValueError(f"multislerp: {len(tensors)} tensors but {len(weights)} weights")
    if len(tensors) == 1:
        return tensors[0]
    stacked = torch.stack(list(tensors), dim=0)
    if base is not None:
        stacked -= base
    flat = stacked.view(stacked.shape[0], -1)
    w = torch.tensor(list(weights), dtype=stacked.dtype, device=stacked.device)
    if normalize_weights:
        w = w / w.sum()
    norms = torch.norm(flat, dim=-1, keepdim=True)
    units = flat / (norms + eps)
    mean = (units * w.view(-1, 1)).sum(0)
    mean_norm = torch.norm(mean)
    if mean_norm < eps:
        if stacked.shape[0] != 2:
            raise ValueError(
                "multislerp: the weighted sum of the directions is zero (antipodal models with"
                " balancing weights); change the weights"
            )
        res = (stacked[0] * w[0] + stacked[1] * w[1]).view(stacked.shape[1:])
        return res + base if base is not None else res
    mean = mean / mean_norm
    tangents = units - (units * mean).sum(-1, keepdim=True) * mean
    tangent = (tangents * w.view(-1, 1)).sum(0)
    tnorm = torch.norm(tangent) + eps
    out = mean * torch.cos(tnorm) + tangent * (torch.sin(tnorm) / tnorm)
    out = (out * (norms.squeeze(-1) * w).sum()).view(stacked.shape[1:])
    return out + base if base is not None else out


def _karcher_units(
    tensors: Sequence[torch.Tensor], dtype: torch.dtype
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    norms, units = [], []
    for x in tensors:
        norm = torch.linalg.vector_norm(x.to(dtype))
        norms.append(norm)
        units.append(torch.zeros_like(x) if norm.item() == 0.0 else (x / norm).to(x.dtype))
    return norms, units


def karcher(
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float] | None = None,
    max_iter: int = 10,
    tol: float = 1e-5,
) -> torch.Tensor:
    """Weighted Karcher mean of the directions of ``tensors`` times their weighted norm.

    ``weights`` default to equal (mergekit's ``karcher`` merge); zero-norm inputs are left out
    of the direction but still count in the norm.
    """
    if len(tensors) == 1:
        return tensors[0]
    alphas = [1.0 / len(tensors)] * len(tensors) if weights is None else list(weights)
    dtype = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
    norms, units = _karcher_units(tensors, dtype)
    valid = [i for i, n in enumerate(norms) if n.item() > tol]
    if not valid:
        return sum(x * 0 for x in tensors)  # type: ignore[return-value]
    total = sum(alphas[i] for i in valid)
    coefs = [alphas[i] / total for i in valid]
    dirs = [units[i] for i in valid]
    mean = torch.zeros_like(dirs[0])
    for a, u in zip(coefs, dirs, strict=True):
        mean += a * u
    mean_norm = torch.linalg.vector_norm(mean.to(dtype))
    mean = dirs[0].clone() if mean_norm.item() < tol else (mean / mean_norm).to(mean.dtype)
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for a, u in zip(coefs, dirs, strict=True):
            dot = torch.clamp(torch.dot(mean.flatten(), u.flatten()), -1.0, 1.0)
            theta = torch.arccos(dot)
            if theta.item() < tol:
                continue
            tangent += a * (theta / torch.sin(theta)) * (u - dot * mean)
        tnorm = torch.linalg.vector_norm(tangent.to(dtype))
        if tnorm.item() < tol:
            break
        mean = (torch.cos(tnorm) * mean + torch.sin(tnorm) * (tangent / tnorm)).to(mean.dtype)
        unorm = torch.linalg.vector_norm(mean.to(dtype))
        if unorm.item() > tol:
            mean = (mean / unorm).to(mean.dtype)
    scale = sum(a * n for a, n in zip(alphas, norms, strict=True))
    return scale * mean  # type: ignore[return-value]
