"""Truncated SVD factorization of weight matrices and rank selection (pure functions).

A weight ``W [out, in]`` becomes ``A [out, r] @ B [r, in]`` with ``A = U_r sqrt(S_r)`` and
``B = sqrt(S_r) V_r^T``: the singular values are split evenly, so both factors have the same
scale (better conditioned for fine-tuning and for quantizing each factor later). The pair costs
``r * (out + in)`` parameters instead of ``out * in``.

A Conv2d weight ``[out, in, kh, kw]`` is factored as the matrix ``[out, in*kh*kw]``: ``B``
becomes a convolution with ``r`` output channels and the original kernel, stride, padding and
dilation, ``A`` a 1x1 convolution from ``r`` to ``out`` channels holding the bias.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from slimtorch.core.errors import ConfigError, UnsupportedModelError

RankBy = Literal["energy", "params"]


def _check_matrix(w: Tensor) -> None:
    if w.dim() != 2:
        raise UnsupportedModelError(
            f"expected a weight matrix [out, in], got shape {tuple(w.shape)}; reshape"
            " convolution weights to [out, in*kh*kw] first"
        )
    if not torch.isfinite(w).all():
        raise UnsupportedModelError("the weight holds NaN/Inf values; fix the model first")


def singular_values(w: Tensor) -> Tensor:
    """Singular values of ``w`` (float64, descending)."""
    _check_matrix(w)
    return torch.linalg.svdvals(w.detach().to(torch.float64))


def truncated_svd(w: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """``(A [out, r], B [r, in])`` with ``A @ B`` the best rank-``r`` approximation of ``w``."""
    _check_matrix(w)
    if not 1 <= rank <= min(w.shape):
        raise ConfigError(f"rank must be in 1..{min(w.shape)} for a {tuple(w.shape)} weight")
    u, s, vh = torch.linalg.svd(w.detach().to(torch.float64), full_matrices=False)
    root = s[:rank].sqrt()
    a = u[:, :rank] * root
    b = root[:, None] * vh[:rank]
    return a.to(w.dtype), b.to(w.dtype)


def energy_rank(s: Tensor, energy: float) -> int:
    """The smallest ``r`` whose leading singular values hold ``energy`` of ``sum(s^2)``."""
    if not 0.0 < energy <= 1.0:
        raise ConfigError(f"energy must be in (0, 1], got {energy}")
    sq = s.detach().to(torch.float64) ** 2
    total = float(sq.sum())
    if total == 0.0:
        return 1
    frac = torch.cumsum(sq, 0) / total
    # a relative slack of 1e-12 so energy=1.0 is reached despite rounding in the cumulative sum
    r = int(torch.searchsorted(frac, torch.tensor([energy - 1e-12], dtype=frac.dtype))) + 1
    return min(r, s.numel())


def params_rank(rows: int, cols: int, ratio: float) -> int:
    """``floor(ratio * rows * cols / (rows + cols))``: the rank keeping ``ratio`` of the params."""
    if not 0.0 < ratio < 1.0:
        raise ConfigError(f"param_ratio must be in (0, 1), got {ratio}")
    return math.floor(ratio * rows * cols / (rows + cols))


def reduces_params(rows: int, cols: int, rank: int) -> bool:
    """Whether two factors of rank ``rank`` are smaller than the ``rows x cols`` matrix."""
    return rank * (rows + cols) < rows * cols


def choose_rank(w: Tensor, rank_by: RankBy, energy: float = 0.9, param_ratio: float = 0.5) -> int:
    """The rank for ``w`` by energy threshold or parameter budget (0 when it rounds to none)."""
    rows, cols = w.shape
    if rank_by == "energy":
        return energy_rank(singular_values(w), energy)
    if rank_by == "params":
        return min(params_rank(rows, cols, param_ratio), min(rows, cols))
    raise ConfigError(f"rank_by must be 'energy' or 'params', got {rank_by!r}")
