"""SparseGPT (Frantar & Alistarh, 2023): prune a weight column block by column block, choosing
the mask by the OBS saliency ``w^2 / [H^-1]_jj^2`` and compensating every pruned (and, when a
quantizer is given, every quantized) weight through the inverse Hessian of the layer's inputs.

    sparsegpt_prune(w [out, in], H [in, in], 0.5)           -> (w', keep_mask)
    sparsegpt_prune(w, H, 0.0, n=2, m=4)                     -> exact 2:4 along the input axis

``H`` comes from ``slimtorch.calibrate.statistics.HessianAccumulator``. Unstructured masks are
chosen per block of ``block_size`` columns over all rows, and the per-block counts are spread so
that exactly ``round(sparsity * out * in)`` weights are pruned in all.
"""

from __future__ import annotations

from typing import Protocol

import torch

from slimtorch.calibrate.statistics import (
    check_second_order,
    dead_inputs,
    inverse_cholesky,
    window,
)
from slimtorch.core.errors import ConfigError
from slimtorch.prune.criteria import lowest_k_mask, num_pruned
from slimtorch.prune.nm import check_nm


class ColumnQuantizer(Protocol):
    """Quantizes a weight column by column while SparseGPT prunes it (joint sparse + quant).

    ``slimtorch.quantize.gptq.ColumnGrid`` implements it; its ``result(weight)`` then gives the
    codes and group scales of the pruned, quantized weight (pruned weights get code = zero point).
    """

    width: int

    def needs_fit(self, k: int) -> bool: ...

    def fit(self, k: int, window: torch.Tensor) -> None: ...

    def quantize(self, k: int, col: torch.Tensor) -> torch.Tensor: ...


def _check(
    weight: torch.Tensor, hessian: torch.Tensor, sparsity: float, n: int, m: int, block: int
) -> None:
    check_second_order(weight, hessian, block)
    if n or m:
        check_nm(n, m)
        if weight.shape[1] % m:
            raise ConfigError(
                f"{n}:{m} sparsity needs the input size ({weight.shape[1]}) to be a multiple of"
                f" m={m}; ignore this layer or choose an m that divides it"
            )
    elif not 0.0 <= sparsity < 1.0:
        raise ConfigError(f"sparsity must be in [0, 1), got {sparsity}; e.g. 0.5")


def _nm_prune(
    keep: torch.Tensor, scores: torch.Tensor, j: int, n: int, prior: torch.Tensor | None
) -> None:
    """Drop the ``m - n`` lowest ``scores`` ``[out, m]`` of the group at block column ``j``."""
    m = scores.shape[1]
    if prior is not None:
        scores = scores.masked_fill(~prior, -1.0)
    drop = torch.sort(scores, dim=1, stable=True).indices[:, : m - n]
    keep[:, j : j + m].scatter_(1, drop, False)


def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float,
    *,
    n: int = 0,
    m: int = 0,
    block_size: int = 128,
    damp: float = 0.01,
    quantizer: ColumnQuantizer | None = None,
    prior: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune ``weight`` ``[out, in]`` to ``sparsity`` (or ``n:m`` when set); ``(w', keep_mask)``.

    ``prior`` (True = kept) ranks already-pruned weights lowest and keeps them pruned.
    ``quantizer`` quantizes the kept weights at the same time (see :class:`ColumnQuantizer`).
    """
    _check(weight, hessian, sparsity, n, m, block_size)
    if n:
        block_size = max(m, block_size // m * m)  # N:M groups never straddle two blocks
    w = weight.detach().to(torch.float32).clone()
    h = hessian.detach().clone()
    h = h if h.dtype in (torch.float32, torch.float64) else h.to(torch.float32)
    dead = torch.nonzero(dead_inputs(h)).flatten()
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    u = inverse_cholesky(h, damp)
    rows, cols = w.shape
    mask = torch.ones_like(w, dtype=torch.bool)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        w1, u1 = w[:, i1:i2].clone(), u[i1:i2, i1:i2]
        d2 = torch.diagonal(u1).pow(2)
        p1 = None if prior is None else prior[:, i1:i2].to(torch.bool)
        if n:
            keep1 = torch.ones_like(w1, dtype=torch.bool)
        else:
            scores = w1.pow(2) / d2
            if p1 is not None:
                scores = scores.masked_fill(~p1, -1.0)
            k = num_pruned(rows * i2, sparsity) - num_pruned(rows * i1, sparsity)
            keep1 = lowest_k_mask(scores, k)
        if p1 is not None:
            keep1 &= p1
        err = torch.zeros_like(w1)
        for j in range(i2 - i1):
            if n and j % m == 0:
                scores = w1[:, j : j + m].pow(2) / d2[j : j + m]
                _nm_prune(keep1, scores, j, n, None if p1 is None else p1[:, j : j + m])
            col = w1[:, j]
            qc = col * keep1[:, j]
            if quantizer is not None:
                if quantizer.needs_fit(i1 + j):
                    quantizer.fit(i1 + j, window(w, w1, i1, j, quantizer.width))
                qc = quantizer.quantize(i1 + j, qc)
            e = (col - qc) / u1[j, j]
            w1[:, j:] -= e.unsqueeze(1) * u1[j, j:].unsqueeze(0)
            w1[:, j] = qc
            err[:, j] = e
        w[:, i1:i2] = w1
        w[:, i2:] -= err @ u[i1:i2, i2:]
        mask[:, i1:i2] = keep1
    return w.to(weight.dtype), mask
