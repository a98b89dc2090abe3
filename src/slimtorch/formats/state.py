"""The compression state of one weight, as techniques leave it and as the artifact stores it.

A compressed weight is still an ordinary parameter holding its *effective* values (what the model
computes with), so a compressed model runs unchanged. Beside it, the owning module carries a
:class:`WeightState`: the pruning mask and/or the quantization grid (integer codes, scales, zero
points). :func:`effective_weight` turns a state back into values, and both the techniques and the
artifact loader use it, so a loaded model is bit-identical to the one that was saved.

Shapes: quantization parameters live in the matrix view of the weight (``[out, in]``, see
``slimtorch.graph.weights.to_matrix``; here re-implemented to keep formats free of graph):
per tensor ``[1, 1]``, per channel ``[out, 1]``, per group ``[out, ceil(in / group_size)]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from slimtorch.formats import floats

Scheme = Literal["affine", "binary", "ternary", "codebook", "float"]
FloatElement = Literal["e4m3", "e2m1"]
ScaleFormat = Literal["e8m0", "e4m3"]
Granularity = Literal["per_tensor", "per_channel", "per_group"]

_STATE_ATTR = "_slimtorch_state"


def to_matrix(w: torch.Tensor) -> torch.Tensor:
    """View a weight as ``[out, in]``; ND conv weights put the input channel last."""
    if w.dim() == 2:
        return w
    if w.dim() < 2:
        return w.reshape(1, -1)
    perm = (0, *range(2, w.dim()), 1)
    return w.permute(perm).reshape(w.shape[0], -1)


def from_matrix(m: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Inverse of :func:`to_matrix` for a tensor of the original ``shape``."""
    shape = tuple(shape)
    if len(shape) <= 2:
        return m.reshape(shape)
    permuted = (shape[0], *shape[2:], shape[1])
    inv = (0, len(shape) - 1, *range(1, len(shape) - 1))
    return m.reshape(permuted).permute(inv).contiguous()


def code_range(bits: int, signed: bool) -> tuple[int, int]:
    """``(qmin, qmax)`` of ``bits``-bit integer codes."""
    if signed:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


@dataclass
class QuantState:
    """A weight quantized onto an integer grid.

    affine:  w = (codes - zero_point) * scale
    binary:  codes in {0, 1},    w = (2 * codes - 1) * scale      (sign times alpha, 1 bit)
    ternary: codes in {0, 1, 2}, w = (codes - 1) * scale          ({-a, 0, +a}, 2 bits)
    codebook: codes in [0, len(codebook)), w = codebook[codes]     (weight sharing, k-means)
    float:   codes are the bit patterns of ``element`` (``e4m3``: FP8, 0..255; ``e2m1``: FP4,
             0..15, see :mod:`slimtorch.formats.floats`),
             w = decode(codes) * (scale / global_scale)                 (FP8, MXFP4, NVFP4)

    A codebook state has ``granularity="per_tensor"`` and an empty ``scale``/``zero_point``;
    several weights may hold the same ``codebook`` tensor (cross-layer sharing), and the
    artifact then stores it once.
    """

    scheme: Scheme
    bits: int
    signed: bool
    granularity: Granularity
    codes: torch.Tensor  # integer tensor, same shape as the weight
    scale: torch.Tensor  # float32, matrix-view shape (see module docstring)
    zero_point: torch.Tensor  # int32 (float32: fractional zero points, HQQ), shape of scale
    group_size: int | None = None
    scale_dtype: Literal["float16", "float32"] = "float32"
    codebook: torch.Tensor | None = None  # float32 [K], K <= 2**bits (scheme "codebook" only)
    # scheme "float" only: the element format of the codes; the 1-byte float format every scale
    # is exactly representable in (the artifact then stores the scales' codes, one byte each;
    # None: float32 scales); the per-tensor divisor of the scales (NVFP4's, compressed-tensors'
    # ``weight_global_scale`` = 6 * 448 / amax; float32 [1]) or None
    element: FloatElement | None = None
    scale_format: ScaleFormat | None = None
    global_scale: torch.Tensor | None = None

    def expand(self, t: torch.Tensor, in_features: int) -> torch.Tensor:
        """Broadcast a per-group parameter to ``[out, in]``."""
        if self.granularity == "per_group":
            assert self.group_size is not None
            return t.repeat_interleave(self.group_size, dim=1)[:, :in_features]
        return t


@dataclass
class WeightState:
    """What slimtorch knows about one compressed weight. ``mask`` is True where a weight is kept."""

    mask: torch.Tensor | None = None
    quant: QuantState | None = None
    extra: dict[str, object] = field(default_factory=dict)


def dequantize(q: QuantState, shape: Sequence[int]) -> torch.Tensor:
    """Float32 values of a quantized weight (without its mask)."""
    if q.scheme == "codebook":
        if q.codebook is None:
            raise ValueError("a codebook quantization state has no codebook")
        return q.codebook.to(torch.float32)[q.codes.to(torch.int64)].reshape(tuple(shape))
    if q.scheme == "float":
        return from_matrix(_float_values(q), shape)
    if q.scheme == "affine" and q.bits <= 16:
        return from_matrix(_affine_values(q), shape)
    codes = to_matrix(q.codes.to(torch.int32))
    in_features = codes.shape[1]
    scale = q.expand(q.scale.to(torch.float32), in_features)
    if q.scheme == "affine":
        zp = q.expand(q.zero_point.to(torch.int32), in_features)
        m = (codes - zp).to(torch.float32) * scale
    elif q.scheme == "binary":
        m = (codes * 2 - 1).to(torch.float32) * scale
    elif q.scheme == "ternary":
        m = (codes - 1).to(torch.float32) * scale
    else:  # pragma: no cover - guarded by the Literal type
        raise ValueError(f"unknown quantization scheme {q.scheme!r}")
    return from_matrix(m, shape)


def float_scale(q: QuantState) -> torch.Tensor:
    """The float32 scale each element of a ``float`` state is multiplied by (matrix view, per
    group): ``scale / global_scale``, in that order (what compressed-tensors computes)."""
    scale = q.scale.to(torch.float32)
    if q.global_scale is not None:
        scale = scale / q.global_scale.to(torch.float32).reshape(1, 1)
    return scale


def _float_values(q: QuantState) -> torch.Tensor:
    """``decode(codes) * scale / global_scale`` as float32 ``[out, in]``."""
    if q.element is None:
        raise ValueError("a float quantization state has no element format")
    values = to_matrix(floats.decode(q.codes, q.element))
    return values * q.expand(float_scale(q), values.shape[1])


def _affine_values(q: QuantState) -> torch.Tensor:
    """``(codes - zero_point) * scale`` as float32 ``[out, in]`` in one buffer: the codes and
    zero points are small integers (``bits <= 16``), exact in float32, so subtracting them as
    floats gives the values the int32 difference would, and the product is the same float32
    product; a group's parameters are broadcast over a view instead of repeated to full size.
    Temporaries: none as big as the weight (the int32 route took three more of its size)."""
    codes = q.codes.to(torch.int32) if q.codes.is_floating_point() else q.codes
    m = to_matrix(codes.to(torch.float32, copy=True))
    zp = q.zero_point.to(torch.float32)  # whole numbers, or fractional (HQQ): both exact
    scale = q.scale.to(torch.float32)
    rows, in_features = m.shape
    size = q.group_size or 0
    if q.granularity == "per_group" and size and in_features % size == 0 and m.is_contiguous():
        grouped = m.view(rows, in_features // size, size)
        grouped.sub_(zp.unsqueeze(-1)).mul_(scale.unsqueeze(-1))
        return m
    m.sub_(q.expand(zp, in_features))
    return m.mul_(q.expand(scale, in_features))


def fractional_zero(q: QuantState) -> bool:
    """Whether ``q`` has fractional (float) zero points, which integer-grid formats cannot hold."""
    return q.zero_point.is_floating_point() and bool((q.zero_point != q.zero_point.round()).any())


def codebook_state(codes: torch.Tensor, codebook: torch.Tensor, bits: int) -> QuantState:
    """A weight-sharing state: ``codes`` index ``codebook`` (float32, at most ``2**bits`` values)."""
    if codebook.numel() > 2**bits:
        raise ValueError(
            f"a {bits}-bit index addresses {2**bits} centroids, got {codebook.numel()}"
        )
    return QuantState(
        scheme="codebook",
        bits=bits,
        signed=False,
        granularity="per_tensor",
        codes=codes,
        scale=torch.empty(0),
        zero_point=torch.empty(0, dtype=torch.int32),
        codebook=codebook,
    )


def effective_weight(state: WeightState, like: torch.Tensor) -> torch.Tensor:
    """The values a weight with ``state`` computes with, in the dtype and shape of ``like``."""
    if state.quant is not None:
        w = dequantize(state.quant, like.shape)
    else:
        w = like.detach().to(torch.float32)
    if state.mask is not None:
        w = w * state.mask.to(w.dtype)
    return w.to(like.dtype)


def get_state(module: nn.Module, param: str) -> WeightState | None:
    states: dict[str, WeightState] = module.__dict__.get(_STATE_ATTR, {})
    return states.get(param)


def set_state(module: nn.Module, param: str, state: WeightState) -> None:
    module.__dict__.setdefault(_STATE_ATTR, {})[param] = state


def clear_state(module: nn.Module, param: str) -> None:
    module.__dict__.get(_STATE_ATTR, {}).pop(param, None)


def iter_states(model: nn.Module) -> list[tuple[str, nn.Module, str, WeightState]]:
    """``(module_name, module, param, state)`` for every weight of ``model`` with a state."""
    out = []
    for name, module in model.named_modules():
        for param, state in module.__dict__.get(_STATE_ATTR, {}).items():
            out.append((name, module, param, state))
    return out


def apply_state(module: nn.Module, param: str, state: WeightState) -> None:
    """Record ``state`` and write its effective values into the parameter, in place."""
    set_state(module, param, state)
    p = getattr(module, param)
    with torch.no_grad():
        p.copy_(effective_weight(state, p))
