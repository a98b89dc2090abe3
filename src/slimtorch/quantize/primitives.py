"""Affine quantization maths, as pure functions over tensors.

    codes = clamp(round(w / scale) + zero_point, qmin, qmax)      w ~ (codes - zero_point) * scale

Weights are handled in their matrix view ``[out, in]`` and cut into *blocks* ``[rows, groups,
size]``: per tensor ``[1, 1, out*in]``, per channel ``[out, 1, in]``, per group ``[out, G, gs]``
(the last group zero-padded). Every grid built here represents 0 exactly, so zero padding and
pruned (zeroed) weights never change a range and never add error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from slimtorch.core.errors import ConfigError
from slimtorch.formats.state import Granularity, code_range

Observer = Literal["minmax", "mse"]
ScaleDtype = Literal["float16", "float32"]

FP16_MIN_NORMAL = 2.0**-14
FP16_MAX = 65504.0
FP16_REL_TOL = 1e-3


@dataclass(frozen=True)
class QuantSpec:
    """One affine grid: ``bits`` (2..8), signed codes or not, symmetric or not, granularity."""

    bits: int = 8
    signed: bool = True
    symmetric: bool = True
    granularity: Granularity = "per_channel"
    group_size: int | None = None
    observer: Observer = "minmax"
    # symmetric grids only: use all 2**bits signed codes, as llama.cpp's Q4_0 does - the scale
    # takes the sign that puts each block's largest-magnitude weight on the extra negative code
    # (scale = -extreme / 2**(bits-1), so it may be negative); else scale = amax / (2**(bits-1)-1)
    full_range: bool = False

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 8:
            raise ConfigError(
                f"bits={self.bits} is not supported by affine quantization; use 2..8"
                " (quantize.binary / quantize.ternary give 1- and 2-level weights)"
            )
        if self.granularity not in ("per_tensor", "per_channel", "per_group"):
            raise ConfigError(
                f"granularity={self.granularity!r}; use per_tensor, per_channel or per_group"
            )
        if self.granularity == "per_group" and (self.group_size is None or self.group_size < 1):
            raise ConfigError(
                f"per_group quantization needs group_size >= 1 (got {self.group_size});"
                " set group_size, e.g. 128"
            )
        if self.observer not in ("minmax", "mse"):
            raise ConfigError(f"observer={self.observer!r}; use 'minmax' or 'mse'")
        if self.full_range and not (self.symmetric and self.signed):
            raise ConfigError(
                "full_range applies to symmetric signed grids only; set symmetric: true, or"
                " drop full_range (an asymmetric grid already uses every code)"
            )

    @property
    def qrange(self) -> tuple[int, int]:
        return code_range(self.bits, self.signed)


def block_size(spec: QuantSpec, in_features: int) -> int:
    """The group size actually used: a row shorter than ``group_size`` is one group."""
    if spec.granularity == "per_group":
        assert spec.group_size is not None
        return min(spec.group_size, in_features)
    return in_features


def to_blocks(m: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """``[rows, groups, size]`` view of the matrix ``m`` ``[out, in]`` (zero-padded groups)."""
    out, inp = m.shape
    if spec.granularity == "per_tensor":
        return m.reshape(1, 1, out * inp)
    if spec.granularity == "per_channel":
        return m.reshape(out, 1, inp)
    gs = block_size(spec, inp)
    groups = math.ceil(inp / gs)
    pad = groups * gs - inp
    return (F.pad(m, (0, pad)) if pad else m).reshape(out, groups, gs)


def expand_params(t: torch.Tensor, spec: QuantSpec, in_features: int) -> torch.Tensor:
    """Broadcast a ``[rows, groups]`` parameter against the ``[out, in]`` matrix."""
    if spec.granularity == "per_group":
        gs = block_size(spec, in_features)
        return t.repeat_interleave(gs, dim=1)[:, :in_features]
    return t


def affine_scale(lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Scale of the grid covering ``[lo, hi]`` (always widened to include 0); never 0 or NaN
    (negative for a ``full_range`` block whose extreme is positive)."""
    qmin, qmax = spec.qrange
    if spec.symmetric and spec.full_range:
        # the extreme of larger magnitude lands on code -2**(bits-1): scale = -extreme / 2**(b-1)
        extreme = torch.where(hi.abs() >= lo.abs(), hi, lo)
        scale = -extreme / 2 ** (spec.bits - 1)
    elif spec.symmetric:
        amax = torch.maximum(hi.abs(), lo.abs())
        scale = amax / (2 ** (spec.bits - 1) - 1)
    else:
        scale = (hi.clamp(min=0) - lo.clamp(max=0)) / (qmax - qmin)
    # an all-zero block (or a range underflowing float32) gets scale 1: its codes are the zero point
    usable = (scale != 0) & torch.isfinite(scale)
    return torch.where(usable, scale, torch.ones_like(scale))


def affine_zero_point(lo: torch.Tensor, scale: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Integer zero point (int32): 0 / mid-point for symmetric grids, else maps ``lo`` to qmin."""
    qmin, qmax = spec.qrange
    if spec.symmetric:
        mid = 0 if spec.signed else 2 ** (spec.bits - 1)
        return torch.full_like(scale, mid, dtype=torch.int32)
    zp = qmin - torch.round(lo.clamp(max=0) / scale)
    return zp.clamp(qmin, qmax).to(torch.int32)


def affine_codes(
    m: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, spec: QuantSpec
) -> torch.Tensor:
    """Integer codes (as float) of ``m`` on the grid; parameters broadcast against ``m``."""
    qmin, qmax = spec.qrange
    return torch.clamp(torch.round(m / scale) + zero_point, qmin, qmax)


def fake_quantize_blocks(
    blocks: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec
) -> torch.Tensor:
    """Quantize-dequantize ``blocks`` ``[..., size]`` with the grid of ranges ``[lo, hi]`` ``[...]``."""
    scale = affine_scale(lo, hi, spec)
    zp = affine_zero_point(lo, scale, spec)
    s, z = scale.unsqueeze(-1), zp.unsqueeze(-1).to(blocks.dtype)
    return (affine_codes(blocks, s, z, spec) - z) * s


def round_scale_fp16(scale: torch.Tensor) -> tuple[torch.Tensor, ScaleDtype]:
    """Scales rounded to fp16 (still float32) when every one survives that within 1e-3.

    fp16 is chosen only when all non-zero scales are in the fp16 normal range; codes must then be
    computed with the returned (rounded) scales, so storing the scales as fp16 is exact.
    """
    s16 = scale.to(torch.float16).to(torch.float32)
    mag = scale.abs()
    in_range = (mag == 0) | ((mag >= FP16_MIN_NORMAL) & (mag <= FP16_MAX))
    close = (s16 - scale).abs() <= FP16_REL_TOL * mag
    if bool((in_range & close & torch.isfinite(s16)).all()):
        return s16, "float16"
    return scale, "float32"


def code_dtype(bits: int, signed: bool) -> torch.dtype:
    """Smallest integer dtype holding ``bits``-bit codes."""
    if bits <= 8:
        return torch.int8 if signed else torch.uint8
    return torch.int16 if signed else torch.int32
