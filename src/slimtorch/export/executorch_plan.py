"""Which weights an ExecuTorch XNNPACK file can hold as slimtorch's own integer codes.

XNNPACK computes quantized Linear/Conv2d layers with dynamically quantized int8 activations
(``qd8``: asymmetric int8 codes chosen per row at run time) and one of two weight layouts:

* ``qc8w``: int8 codes, one float32 scale per output channel, zero point 0 (Linear, and 2-D
  Conv2d that is not depthwise);
* ``qb4w``: signed 4-bit codes (-8..7) in groups along the input, one scale per group (stored
  as bfloat16 by ExecuTorch), zero point 0 (Linear only, the input width a multiple of the
  group; what ExecuTorch calls 8da4w).

A weight whose quantization state has integer zero points is carried as the signed integers
``codes - zero_point``, which decode to the same values with zero point 0: symmetric int8, and
also asymmetric 4-bit codes whose shifted values fit int8 (per output channel). Anything else
(codebooks, per-group 8-bit, fractional zero points, pruning only) stays dense float, with the
reason. Pure functions over tensors; no ExecuTorch import.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from slimtorch.formats.state import QuantState, fractional_zero, iter_states, to_matrix


@dataclass
class Carried:
    """A weight carried as integer codes: ``weight ~ codes * scale`` (zero point 0).

    ``codes`` int8 ``[out, K]`` (matrix view of the weight), ``scale`` float32 ``[out]``
    (``qc8w``) or ``[out, K // group]`` (``qb4w``).
    """

    module: str
    layout: str  # "qc8w" | "qb4w"
    codes: Tensor
    scale: Tensor
    group: int | None = None


def _signed_codes(q: QuantState, mask: Tensor | None) -> tuple[Tensor, Tensor, int | None]:
    """``codes - zero_point`` as int32 ``[out, K]``, the scale ``[out, G]`` and the group."""
    codes = to_matrix(q.codes.to(torch.int32))
    out, k = codes.shape
    scale = q.scale.detach().to(torch.float32).reshape(out if q.scale.numel() > 1 else 1, -1)
    zp = q.zero_point.detach().round().to(torch.int32).reshape(scale.shape)
    scale, zp = scale.expand(out, scale.shape[1]), zp.expand(out, zp.shape[1])
    group = q.group_size if q.granularity == "per_group" else None
    if group is not None:
        zp_full = zp.repeat_interleave(group, dim=1)[:, :k]
    else:
        zp_full = zp.expand(out, k) if zp.shape[1] == 1 else zp
    if mask is not None:  # pruned entries decode to exactly 0
        codes = torch.where(to_matrix(mask.to(torch.bool)), codes, zp_full)
    return codes - zp_full, scale.contiguous(), group


def _decodes_to(codes: Tensor, scale: Tensor, group: int | None, weight: Tensor) -> bool:
    """Whether ``codes * scale`` (per row, or per group of ``group`` columns) is ``weight``."""
    k = codes.shape[1]
    full = scale.repeat_interleave(group, dim=1)[:, :k] if group else scale
    decoded = codes.to(torch.float32) * full
    target = to_matrix(weight.detach().to(torch.float32))
    return decoded.shape == target.shape and torch.allclose(decoded, target, rtol=1e-6, atol=0)


def plan_weight(
    name: str, module: nn.Module, q: QuantState | None, mask: Tensor | None
) -> Carried | str:
    """How the weight of ``module`` (named ``name``) is carried, or why it stays dense."""
    is_linear = isinstance(module, nn.Linear)
    if not (is_linear or isinstance(module, nn.Conv2d)):
        return f"{type(module).__name__} weights: XNNPACK quantizes Linear and Conv2d only"
    if isinstance(module, nn.Conv2d) and module.weight.shape[1] == 1:
        return (
            "one input channel per group (depthwise for XNNPACK, the first convolution of a"
            " grayscale model too): XNNPACK has no dynamically quantized kernel for it"
        )
    if isinstance(module, nn.Conv2d) and module.padding_mode != "zeros":
        return f"padding_mode {module.padding_mode!r}: only zero padding is lowered"
    if q is None:
        return "no quantization state (dense or pruned only)"
    if q.scheme != "affine":
        return f"{q.scheme} weights: XNNPACK has no lookup-table or +-1 weight layout"
    if fractional_zero(q):
        return "fractional zero points (HQQ): XNNPACK's zero point is 0"
    codes, scale, group = _signed_codes(q, mask)
    if not _decodes_to(codes, scale, group, module.get_parameter("weight")):
        return "its quantization state does not reproduce the weight's values"
    lo, hi = int(codes.min()), int(codes.max())
    if scale.shape[1] == 1:
        if lo < -128 or hi > 127:
            return f"codes - zero point span {lo}..{hi}: does not fit int8"
        return Carried(name, "qc8w", codes.to(torch.int8), scale[:, 0].contiguous())
    if not is_linear:
        return "per-group scales on a convolution: XNNPACK groups Linear weights only"
    assert group is not None
    if lo < -8 or hi > 7:
        return (
            f"per-group codes - zero point span {lo}..{hi}: XNNPACK's grouped weights are signed"
            " 4-bit (-8..7); quantize with symmetric: true, bits: 4"
        )
    if codes.shape[1] % group:
        return f"input width {codes.shape[1]} is not a multiple of the group {group}"
    return Carried(name, "qb4w", codes.to(torch.int8), scale, group)


def plan_model(model: nn.Module) -> tuple[list[Carried], list[dict[str, str]]]:
    """Every ``weight`` of ``model`` carried as codes, and the dense ones with their reason."""
    from slimtorch.runtime.int8 import Int8DynamicLinear

    carried: list[Carried] = []
    dense: list[dict[str, str]] = []
    seen: set[str] = set()
    for mname, module, pname, state in iter_states(model):
        if pname != "weight":
            dense.append({"param": f"{mname}.{pname}", "reason": "not a layer weight"})
            continue
        seen.add(mname)
        found = plan_weight(mname, module, state.quant, state.mask)
        if isinstance(found, str):
            dense.append({"param": f"{mname}.weight", "reason": found})
        else:
            carried.append(found)
    for mname, module in model.named_modules():
        if isinstance(module, Int8DynamicLinear) and mname not in seen:
            codes = module.weight_int8.detach().to(torch.int8)
            scale = module.weight_scale.detach().to(torch.float32)
            carried.append(Carried(mname, "qc8w", codes.clone(), scale.clone()))
    return carried, dense


def fold_scale(c: Carried, factor: Tensor) -> Carried:
    """``c`` with its scales multiplied per output channel by ``factor`` (a folded BatchNorm):
    the codes are unchanged."""
    f = factor.detach().to(torch.float32)  # positive: a negative scale would flip the codes
    scale = c.scale * (f if c.scale.dim() == 1 else f[:, None])
    return Carried(c.module, c.layout, c.codes, scale.contiguous(), c.group)
