"""Range observers: which ``[lo, hi]`` each block of a weight is quantized over.

``minmax`` takes the extremes. ``mse`` shrinks the range by factors ``c`` in ``[0.2, 1.0]``
(100 candidates) and keeps, per block, the one with the least squared quantization error;
``c = 1`` (min-max) is a candidate, so its error is never worse. Blocks are ``[rows, groups,
size]`` (see ``primitives.to_blocks``); pruned and padding entries are zero and add no error.

``weights`` (broadcast against the blocks, e.g. ``[1, groups, size]``) make the error a weighted
sum: GPTQ passes the Hessian's diagonal (the mean squared input of each column, what llama.cpp's
importance matrix holds), so the range is chosen for the error the layer's output sees.
"""

from __future__ import annotations

import torch

from slimtorch.quantize.primitives import QuantSpec, fake_quantize_blocks

MSE_GRID = 100
MSE_MIN_SHRINK = 0.2
_CHUNK_ELEMENTS = 1 << 20  # candidates are evaluated in chunks of about this many values


def minmax_range(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block ``(min, max)``, shape ``blocks.shape[:-1]``."""
    return blocks.amin(dim=-1), blocks.amax(dim=-1)


def mse_range(
    blocks: torch.Tensor,
    spec: QuantSpec,
    grid: int = MSE_GRID,
    min_shrink: float = MSE_MIN_SHRINK,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block range ``(c*min, c*max)`` minimising the (``weights``-weighted) squared error."""
    lo, hi = minmax_range(blocks)
    # descending, so ties keep the widest range (min-max itself at c = 1)
    factors = torch.linspace(1.0, min_shrink, grid, dtype=blocks.dtype, device=blocks.device)
    best_err = torch.full_like(lo, float("inf"))
    best_c = torch.ones_like(lo)
    chunk = max(1, _CHUNK_ELEMENTS // max(1, blocks.numel()))
    for start in range(0, grid, chunk):
        c = factors[start : start + chunk].view(-1, *([1] * lo.dim()))  # [k, 1, 1]
        q = fake_quantize_blocks(blocks.unsqueeze(0), c * lo, c * hi, spec)
        err = (q - blocks).pow_(2)
        if weights is not None:
            err = err.mul_(weights)
        err = err.sum(dim=-1)  # [k, rows, groups]
        chunk_err, idx = err.min(dim=0)
        better = chunk_err < best_err
        best_err = torch.where(better, chunk_err, best_err)
        best_c = torch.where(better, c.flatten()[idx], best_c)
    return best_c * lo, best_c * hi


def observe(
    blocks: torch.Tensor, spec: QuantSpec, weights: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The range ``spec.observer`` picks for every block (``weights``: see ``mse_range``)."""
    if spec.observer == "mse":
        return mse_range(blocks, spec, weights=weights)
    return minmax_range(blocks)
