"""Half-quadratic quantization (HQQ, Badri & Shaji 2023): calibration-free, per group.

Each group of ``group_size`` consecutive input columns of a row gets the asymmetric grid

    codes = clamp(round(w / scale + zero), 0, 2**bits - 1)        w ~ (codes - zero) * scale

with the min-max ``scale`` held fixed and a *fractional* ``zero`` found by minimising the
lp-norm (p < 1) of the error ``W - dequant(quant(W))``: the half-quadratic splitting brings in
an auxiliary error ``W_e`` and alternates

    W_e  = shrink_p(W - dequant(quant(W)), beta)                   (generalised soft threshold)
    zero = mean over the group of (codes - (W - W_e) / scale)      (closed form)
    beta = beta * kappa

for ``iterations`` steps, stopping early (and keeping the previous zero points) as soon as the
mean absolute error over the whole weight stops falling (else the last update is kept) - the
schedule and stopping rule of mobiusml/hqq's ``optimize_weights_proximal_v2``. Everything here is written from the paper's
equations; ``integer_zero`` is our variant for formats that store whole-number zero points
(the zero is rounded at every step and the scale, then free, gets the matching closed form).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from slimtorch.core.errors import ConfigError
from slimtorch.formats.state import QuantState, from_matrix
from slimtorch.quantize.affine import kept_matrix
from slimtorch.quantize.primitives import ScaleDtype, round_scale_fp16


@dataclass(frozen=True)
class HQQParams:
    """The optimiser's settings (mobiusml/hqq's defaults)."""

    iterations: int = 20
    lp_norm: float = 0.7
    beta: float = 10.0
    kappa: float = 1.01
    integer_zero: bool = False


def shrink_lp(x: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    """The proximal step of ``|x|^p`` with weight ``1/beta``: ``sign(x) * max(|x| - |x|^(p-1) /
    beta, 0)`` (p = 1: the soft threshold ``1/beta``). ``x = 0`` maps to 0."""
    mag = x.abs()
    # p < 1: the cut is inf at 0, which the clamp turns into 0
    mag.sub_(1.0 / beta if p == 1 else mag.pow(p - 1).div_(beta))
    return mag.clamp_min_(0.0).mul_(torch.sign(x))


def minmax_grid(blocks: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """HQQ's starting grid of each ``[..., size]`` block: ``scale = (max - min) / (2**bits - 1)``
    (1 for a constant block) and the fractional ``zero = -min / scale``, both ``[..., 1]``."""
    lo = blocks.amin(dim=-1, keepdim=True)
    hi = blocks.amax(dim=-1, keepdim=True)
    span = hi - lo
    scale = torch.where(span > 0, span / (2**bits - 1), torch.ones_like(span))
    return scale, -lo / scale


def hqq_codes(
    blocks: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int
) -> torch.Tensor:
    """Codes (as float) of ``blocks`` on the grid ``(scale, zero)``."""
    return torch.clamp(torch.round(blocks / scale + zero), 0, 2**bits - 1)


def _refit(
    blocks: torch.Tensor, codes: torch.Tensor, error: torch.Tensor, scale: torch.Tensor,
    params: HQQParams, beta: float, bits: int,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """One closed-form update of the grid after the shrinkage step (``error``: ``W - W_r``)."""
    target = blocks - shrink_lp(error, beta, params.lp_norm)
    new_zero = (codes - target / scale).mean(dim=-1, keepdim=True)
    if not params.integer_zero:
        return scale, new_zero
    new_zero = new_zero.round().clamp(0, 2**bits - 1)
    steps = codes - new_zero
    den = (steps * steps).sum(dim=-1, keepdim=True)
    fit = (steps * target).sum(dim=-1, keepdim=True) / den.clamp_min(1e-30)
    return torch.where((den > 0) & (fit > 0), fit, scale), new_zero


def optimize_grid(
    blocks: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, params: HQQParams
) -> tuple[torch.Tensor, torch.Tensor]:
    """HQQ's proximal solver over ``blocks`` ``[..., size]`` from the grid ``(scale, zero)``
    ``[..., 1]``: the grid before the first step whose mean absolute error did not fall, or,
    when none did in ``params.iterations`` steps, the last update (as mobiusml/hqq returns).
    ``integer_zero``: the zero stays whole and the scale moves; else the scale stays as given."""
    if params.integer_zero:
        zero = zero.round()
    beta = params.beta
    best = float("inf")
    best_grid = (scale, zero)
    for _ in range(params.iterations):
        codes = hqq_codes(blocks, scale, zero, bits)
        residual = blocks - (codes - zero) * scale
        error = float(residual.abs().mean())
        if not error < best:
            return best_grid
        best, best_grid = error, (scale, zero)
        scale, zero = _refit(blocks, codes, residual, scale, params, beta, bits)
        beta *= params.kappa
    return scale, zero  # no rise in ``iterations`` steps: the last update, as hqq keeps it


def split_groups(m: torch.Tensor, size: int) -> list[torch.Tensor]:
    """The ``[out, groups, size]`` blocks of the matrix ``m`` ``[out, in]``, and the ragged last
    group ``[out, 1, in % size]`` as a second block when ``size`` does not divide ``in``."""
    out, inp = m.shape
    full = (inp // size) * size
    pieces = [m[:, :full].reshape(out, -1, size)] if full else []
    if full < inp:
        pieces.append(m[:, full:].reshape(out, 1, inp - full))
    return pieces


def fit_grid(
    m: torch.Tensor, bits: int, size: int, params: HQQParams
) -> tuple[torch.Tensor, torch.Tensor, ScaleDtype]:
    """HQQ's grid of every group of ``size`` columns of ``m``: ``scale`` and ``zero``
    ``[out, groups]`` and the scales' storage dtype. Scales are rounded to fp16 where that is
    exact enough (before the solver when it keeps them fixed); fractional zeros then too."""
    pieces = split_groups(m, size)
    starts = [minmax_grid(p, bits) for p in pieces]
    scale0 = torch.cat([s for s, _ in starts], dim=1)
    if not params.integer_zero:
        scale0, _ = round_scale_fp16(scale0)
    scales, zeros, at = [], [], 0
    for piece, (_, zero0) in zip(pieces, starts, strict=True):
        s0 = scale0[:, at : at + piece.shape[1]]
        s, z = optimize_grid(piece, s0, zero0, bits, params)
        scales.append(s)
        zeros.append(z)
        at += piece.shape[1]
    scale, scale_dtype = round_scale_fp16(torch.cat(scales, dim=1).squeeze(-1))
    zero = torch.cat(zeros, dim=1).squeeze(-1)
    if scale_dtype == "float16" and not params.integer_zero:
        zero = zero.to(torch.float16).to(torch.float32)
    return scale, zero, scale_dtype


def hqq_quantize(
    w: torch.Tensor, bits: int, group_size: int | None, params: HQQParams,
    mask: torch.Tensor | None = None,
) -> QuantState:  # fmt: skip
    """HQQ of ``w`` (any weight shape) in groups of ``group_size`` input columns (``None``: one
    group per output channel). The state's zero points are float32 (fractional), or int32 with
    ``params.integer_zero``. Pruned entries (``mask`` False) count as zeros for the grid and get
    the code nearest the zero point (``effective_weight`` zeroes them through the mask)."""
    if not 1 <= bits <= 8:
        raise ConfigError(f"quantize.hqq: bits={bits}; use 1..8")
    m, keep = kept_matrix(w, mask)
    size = m.shape[1] if group_size is None else min(group_size, m.shape[1])
    scale, zero, scale_dtype = fit_grid(m, bits, size, params)
    state = QuantState(
        scheme="affine",
        bits=bits,
        signed=False,
        granularity="per_channel" if group_size is None else "per_group",
        codes=torch.empty(0),
        scale=scale,
        zero_point=zero.to(torch.int32) if params.integer_zero else zero,
        group_size=None if group_size is None else size,
        scale_dtype=scale_dtype,
    )
    s_full = state.expand(scale, m.shape[1])
    z_full = state.expand(zero, m.shape[1])
    codes = hqq_codes(m, s_full, z_full, bits)
    if keep is not None:
        codes = torch.where(keep, codes, z_full.round().clamp(0, 2**bits - 1))
    state.codes = from_matrix(codes.to(torch.uint8), w.shape)
    return state
