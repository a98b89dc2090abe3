"""Block-wise reconstruction of quantized weights (EfficientQAT's Block-AP), as functions.

One block (a decoder layer) at a time, its quantized Linear weights are trained to reproduce the
full-precision block's outputs on calibration inputs (mean squared error). Every targeted Linear
gets a :class:`LearnedGrid`: its weight ``W`` and its step sizes ``s`` (one per group) are
trained, the integer zero points ``z`` stay fixed; the forward pass computes with

    W_q = (clamp(round(W / s) + z, qmin, qmax) - z) * s

where ``round`` passes its gradient straight through (the straight-through estimator), so both
``W`` and ``s`` get gradients (``s`` the LSQ way). At the end the codes are read off the trained
``W`` and ``s`` (scales rounded to fp16 first when exact enough, like every slimtorch grid), so
the block stores ordinary affine codes, scales and zero points. Training keeps the start (GPTQ's
or RTN's grid) when it did not lower the block's loss on the calibration inputs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from slimtorch.formats.state import QuantState, from_matrix, to_matrix
from slimtorch.quantize.primitives import code_dtype, round_scale_fp16

Inputs = tuple[tuple[Any, ...], dict[str, Any]]  # (args, kwargs) of one call of the block


@dataclass
class LearnedGrid:
    """One Linear's trainable weight ``[out, in]`` and step sizes ``[out, groups]`` on a fixed
    integer grid (``zero`` ``[out, groups]``, whole numbers stored as float32)."""

    weight: nn.Parameter
    scale: nn.Parameter
    zero: Tensor
    qmin: int
    qmax: int
    group: int  # columns per group (the row length for one scale per row)
    mask: Tensor | None = None  # [out, in] bool: pruned weights stay exactly zero

    def expand(self, t: Tensor) -> Tensor:
        """A ``[out, groups]`` parameter broadcast to ``[out, in]``."""
        return t.repeat_interleave(self.group, dim=1)[:, : self.weight.shape[1]]


def ste_round(x: Tensor) -> Tensor:
    """``round(x)`` forward, identity backward."""
    return x + (torch.round(x) - x).detach()


def safe_scale(s: Tensor, eps: float = 1e-8) -> Tensor:
    """Step sizes kept away from zero (sign kept: full-range grids have negative scales)."""
    sign = torch.where(s < 0, -torch.ones_like(s), torch.ones_like(s))
    return torch.where(s.abs() < eps, sign * eps, s)


def fake_quantize_grid(grid: LearnedGrid) -> Tensor:
    """The values the block computes with: ``(clamp(round(W/s) + z) - z) * s`` (times the mask)."""
    s = grid.expand(safe_scale(grid.scale))
    z = grid.expand(grid.zero)
    q = torch.clamp(ste_round(grid.weight / s) + z, grid.qmin, grid.qmax)
    w = (q - z) * s
    return w if grid.mask is None else w * grid.mask.to(w.dtype)


def grid_from_state(q: QuantState, weight: Tensor, mask: Tensor | None) -> LearnedGrid:
    """A learnable grid starting at an affine state ``q`` with ``weight`` (``[out, in]`` view
    of the start values: the full-precision weight, or the dequantized codes)."""
    if q.scheme != "affine":
        raise ValueError(f"block reconstruction trains affine grids, not {q.scheme!r} ones")
    if q.zero_point.is_floating_point() and bool((q.zero_point != q.zero_point.round()).any()):
        raise ValueError("block reconstruction keeps integer zero points; this grid has fractional")
    w = to_matrix(weight.detach().to(torch.float32)).clone()
    lo, hi = (-(2 ** (q.bits - 1)), 2 ** (q.bits - 1) - 1) if q.signed else (0, 2**q.bits - 1)
    group = q.group_size if q.granularity == "per_group" and q.group_size else w.shape[1]
    scale = q.scale.to(torch.float32).reshape(q.scale.shape)
    zero = q.zero_point.to(torch.float32).reshape(q.scale.shape)
    if scale.shape[0] == 1 and w.shape[0] > 1:  # one scale for the tensor: one per row instead
        scale, zero = scale.expand(w.shape[0], -1), zero.expand(w.shape[0], -1)
    scale, zero = scale.clone(), zero.clone()
    keep = None if mask is None else to_matrix(mask.to(torch.bool))
    return LearnedGrid(nn.Parameter(w), nn.Parameter(scale), zero, lo, hi, int(group), keep)


def grid_state(grid: LearnedGrid, like: QuantState, shape: Sequence[int]) -> QuantState:
    """The trained grid as an affine state of the weight's ``shape``: scales rounded to fp16
    when exact enough, codes computed with those scales (pruned weights on the zero point)."""
    scale, scale_dtype = round_scale_fp16(safe_scale(grid.scale.detach()))
    s, z = grid.expand(scale), grid.expand(grid.zero)
    codes = torch.clamp(torch.round(grid.weight.detach() / s) + z, grid.qmin, grid.qmax)
    if grid.mask is not None:
        codes = torch.where(grid.mask, codes, z)
    per_tensor = like.granularity == "per_tensor"
    return QuantState(
        scheme="affine",
        bits=like.bits,
        signed=like.signed,
        granularity="per_channel" if per_tensor else like.granularity,
        codes=from_matrix(codes.to(code_dtype(like.bits, like.signed)), shape),
        scale=scale,
        zero_point=grid.zero.round().to(torch.int32),
        group_size=like.group_size if like.granularity == "per_group" else None,
        scale_dtype=scale_dtype,
    )


@dataclass(frozen=True)
class TrainSettings:
    """How long and how fast one block trains."""

    steps: int = 50
    weight_lr: float = 1e-5
    scale_lr: float = 1e-4


@dataclass
class BlockResult:
    loss_before: float
    loss_after: float
    kept: bool  # False: training did not help and the start was restored
    losses: list[float] = field(default_factory=list)


def _hidden(out: Any) -> Tensor:
    result = out[0] if isinstance(out, (tuple, list)) else out
    assert isinstance(result, Tensor)
    return result


def block_outputs(block: nn.Module, inputs: Sequence[Inputs]) -> list[Tensor]:
    """The block's hidden-state output on every recorded call (no gradient)."""
    with torch.no_grad():
        return [_hidden(block(*a, **k)).detach() for a, k in inputs]


def _mse(block: nn.Module, grids: dict[str, LearnedGrid], call: Inputs, target: Tensor) -> Tensor:
    weights = {f"{n}.weight": fake_quantize_grid(g).to(target.dtype) for n, g in grids.items()}
    out = _hidden(functional_call(block, weights, call[0], call[1]))
    return F.mse_loss(out.float(), target.float())


def block_loss(
    block: nn.Module,
    grids: dict[str, LearnedGrid],
    inputs: Sequence[Inputs],
    targets: Sequence[Tensor],
) -> float:
    """Mean squared error of the quantized block against ``targets`` over every call."""
    with torch.no_grad():
        total = sum(float(_mse(block, grids, c, t)) for c, t in zip(inputs, targets, strict=True))
    return total / max(1, len(inputs))


def reconstruct_block(
    block: nn.Module,
    grids: dict[str, LearnedGrid],
    inputs: Sequence[Inputs],
    targets: Sequence[Tensor],
    settings: TrainSettings,
) -> BlockResult:
    """Train ``grids`` (keyed by the Linear's name in ``block``) so that ``block`` computing
    with their fake-quantized weights matches ``targets`` (Adam, cosine decay, one recorded
    call a step, cycling); the start is restored when training did not lower the loss."""
    start = {n: (g.weight.detach().clone(), g.scale.detach().clone()) for n, g in grids.items()}
    before = block_loss(block, grids, inputs, targets)
    frozen = [p for p in block.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    opt = torch.optim.Adam(
        [
            {"params": [g.weight for g in grids.values()], "lr": settings.weight_lr},
            {"params": [g.scale for g in grids.values()], "lr": settings.scale_lr},
        ]
    )
    base = [group["lr"] for group in opt.param_groups]
    losses: list[float] = []
    try:
        for step in range(settings.steps):
            k = step % len(inputs)
            decay = 0.5 * (1 + math.cos(math.pi * step / settings.steps))
            for group, lr in zip(opt.param_groups, base, strict=True):
                group["lr"] = lr * decay
            opt.zero_grad(set_to_none=True)
            loss = _mse(block, grids, inputs[k], targets[k])
            if not torch.isfinite(loss):
                break
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
    finally:
        for p in frozen:
            p.requires_grad_(True)
    after = block_loss(block, grids, inputs, targets)
    if not after < before:
        with torch.no_grad():
            for n, g in grids.items():
                g.weight.copy_(start[n][0])
                g.scale.copy_(start[n][1])
        return BlockResult(before, before, False, losses)
    return BlockResult(before, after, True, losses)
