"""Binary (XNOR-Net) and ternary (TWN) weights, per output channel, as pure functions.

binary:  w ~ sign(w) * alpha,   alpha = mean |w| of the channel        codes {0: -a, 1: +a}
ternary: w ~ {-a, 0, +a},       delta = ratio * mean |w|,               codes {0: -a, 1: 0, 2: +a}
         alpha = mean |w| over |w| > delta

Statistics use kept weights only when a pruning mask is given; pruned weights stay exactly 0
because ``effective_weight`` multiplies by the mask (ternary also codes them as 0).
"""

from __future__ import annotations

import torch

from slimtorch.core.errors import ConfigError
from slimtorch.formats.state import QuantState, from_matrix
from slimtorch.quantize.affine import kept_matrix
from slimtorch.quantize.primitives import round_scale_fp16


def _masked_mean(values: torch.Tensor, select: torch.Tensor) -> torch.Tensor:
    """Per-row mean of ``values`` where ``select`` holds, ``[out, 1]``; 0 for empty rows."""
    total = (values * select).sum(dim=1, keepdim=True)
    count = select.sum(dim=1, keepdim=True).clamp_min(1)
    return total / count


def _state(
    scheme: str, bits: int, codes: torch.Tensor, alpha: torch.Tensor, shape: torch.Size
) -> QuantState:
    scale, scale_dtype = round_scale_fp16(alpha)
    return QuantState(
        scheme="binary" if scheme == "binary" else "ternary",
        bits=bits,
        signed=False,
        granularity="per_channel",
        codes=from_matrix(codes.to(torch.uint8), shape),
        scale=scale,
        zero_point=torch.zeros_like(scale, dtype=torch.int32),
        scale_dtype=scale_dtype,
    )


def binarize(w: torch.Tensor, mask: torch.Tensor | None = None) -> QuantState:
    """XNOR-Net binary weights: ``sign(w) * mean|w|`` per output channel (``sign(0) = +1``)."""
    m, keep = kept_matrix(w, mask)
    select = torch.ones_like(m) if keep is None else keep.to(m.dtype)
    alpha = _masked_mean(m.abs(), select)
    codes = (m >= 0).to(torch.uint8)
    return _state("binary", 1, codes, alpha, w.shape)


def ternarize(w: torch.Tensor, mask: torch.Tensor | None = None, ratio: float = 0.7) -> QuantState:
    """TWN ternary weights with threshold ``delta = ratio * mean|w|`` per output channel."""
    if not 0 < ratio < 1.5:
        raise ConfigError(f"ternary threshold ratio={ratio}; use a value in (0, 1.5), e.g. 0.7")
    m, keep = kept_matrix(w, mask)
    select = torch.ones_like(m) if keep is None else keep.to(m.dtype)
    mag = m.abs()
    delta = ratio * _masked_mean(mag, select)
    big = (mag > delta).to(m.dtype) * select
    alpha = _masked_mean(mag, big)
    codes = 1 + (m > delta).to(torch.int8) - (m < -delta).to(torch.int8)
    return _state("ternary", 2, codes, alpha, w.shape)
