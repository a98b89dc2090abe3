"""Quantize one weight tensor onto an affine grid: ``quantize_weight(w, spec, mask) -> QuantState``."""

from __future__ import annotations

import torch

from slimtorch.formats.state import (
    QuantState,
    WeightState,
    effective_weight,
    from_matrix,
    to_matrix,
)
from slimtorch.quantize.observers import observe
from slimtorch.quantize.primitives import (
    QuantSpec,
    affine_codes,
    affine_scale,
    affine_zero_point,
    block_size,
    code_dtype,
    expand_params,
    round_scale_fp16,
    to_blocks,
)


def kept_matrix(
    w: torch.Tensor, mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Float32 matrix view of ``w`` with pruned entries zeroed, and the matrix view of the mask."""
    m = to_matrix(w.detach().to(torch.float32))
    if mask is None:
        return m, None
    keep = to_matrix(mask.to(torch.bool))
    return m.masked_fill(~keep, 0.0), keep


def quantize_weight(
    w: torch.Tensor, spec: QuantSpec, mask: torch.Tensor | None = None
) -> QuantState:
    """Affine quantization of ``w`` (any weight shape; ranges from kept weights only).

    Pruned entries (``mask`` False) get the zero point as code, so they dequantize to exactly 0.
    Scales are rounded to fp16 first when that is exact enough (``scale_dtype="float16"``).
    """
    m, keep = kept_matrix(w, mask)
    in_features = m.shape[1]
    lo, hi = observe(to_blocks(m, spec), spec)
    scale, scale_dtype = round_scale_fp16(affine_scale(lo, hi, spec))
    zero_point = affine_zero_point(lo, scale, spec)
    zp_full = expand_params(zero_point, spec, in_features)
    codes = affine_codes(m, expand_params(scale, spec, in_features), zp_full.to(m.dtype), spec)
    if keep is not None:
        codes = torch.where(keep, codes, zp_full.to(codes.dtype).expand_as(codes))
    return QuantState(
        scheme="affine",
        bits=spec.bits,
        signed=spec.signed,
        granularity=spec.granularity,
        codes=from_matrix(codes.to(code_dtype(spec.bits, spec.signed)), w.shape),
        scale=scale,
        zero_point=zero_point,
        group_size=block_size(spec, in_features) if spec.granularity == "per_group" else None,
        scale_dtype=scale_dtype,
    )


def fake_quantize(
    w: torch.Tensor, spec: QuantSpec, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """The values ``w`` takes after quantization (times ``mask``), in ``w``'s dtype and shape."""
    state = WeightState(mask=mask, quant=quantize_weight(w, spec, mask))
    return effective_weight(state, w.detach())
