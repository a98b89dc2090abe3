"""Int8 weight-only Linear: 8-bit codes with one scale (and zero point) per output channel.

    w[o, k] = (codes[o, k] - zero_point[o]) * scale[o]

State (buffers, in ``state_dict``, portable): ``weight_int8`` int8 ``[out, in]`` (codes shifted
by -128 when they were unsigned 0..255, zero points shifted alike), ``weight_scale`` float32
``[out]``, ``zero_point`` float32 ``[out]`` (whole numbers; all zero for symmetric weights) and
``bias``.

Kernels (``kernel = "auto"`` picks the first that applies; set ``module.kernel`` to force one):

* ``int8pack``: ``torch.ops.aten._weight_int8pack_mm(x, codes, scale)`` (CPU), which computes
  ``(x @ codes^T) * scale``. It is fast with bfloat16 activations only (float32 input runs 2-6x
  slower than a float32 ``F.linear`` on AVX-512, torch 2.13, measured), so activations are cast
  to bfloat16 and the output back. A nonzero zero point is removed after the product, in
  float32: ``y -= scale * zero_point * sum(x)``. The op needs ``in_features % 16 == 0``: codes
  and input are zero-padded to that. Accuracy: bfloat16 rounding of activations and scales,
  about 3e-3 relative error against the float32 dequantized product.
* ``dequant``: ``F.linear(x, dequantized_weight())`` in float32 (the dequantized weight is
  cached). Used off CPU or where the op is missing.

At batch 1 this is a memory-bound product: a quarter of the float32 weight's bytes, about 2.4x
faster than float32 ``F.linear`` for a 49152x576 LM head (one thread, AVX-512, measured).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slimtorch.core.errors import ConfigError, UserInputError
from slimtorch.formats.state import QuantState, to_matrix
from slimtorch.runtime.shapes import LinearShape

Kernel = Literal["auto", "int8pack", "dequant"]
# _weight_int8pack_mm reads past the row ends (segfaults) unless in_features % 16 == 0 (torch
# 2.13, measured): the codes are zero-padded to a multiple of 16 columns, and the input with them
_K_MULTIPLE = 16


def int8pack_available() -> bool:
    """Whether this torch build has the CPU int8 weight-only matmul."""
    try:
        return hasattr(torch.ops.aten, "_weight_int8pack_mm")
    except (AttributeError, RuntimeError):
        return False


class Int8WeightOnlyLinear(LinearShape, nn.Module):
    """``nn.Linear`` replacement with 8-bit per-output-channel quantized weights."""

    weight_int8: Tensor
    weight_scale: Tensor
    zero_point: Tensor
    bias: Tensor | None

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        if in_features < 1 or out_features < 1:
            raise ConfigError(
                f"Int8WeightOnlyLinear({in_features}, {out_features}): sizes must be positive"
            )
        self.in_features = in_features
        self.out_features = out_features
        self.register_buffer(
            "weight_int8", torch.zeros(out_features, in_features, dtype=torch.int8)
        )
        self.register_buffer("weight_scale", torch.ones(out_features))
        self.register_buffer("zero_point", torch.zeros(out_features))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        self.kernel: Kernel = "auto"
        self._plan: tuple[Tensor, Tensor, Tensor | None] | None = None
        self._plan_key: tuple[Any, ...] | None = None
        self._dequant: tuple[tuple[Any, ...], Tensor] | None = None

    # --- construction --------------------------------------------------------------------
    @classmethod
    def from_quantized(
        cls, codes: Tensor, scale: Tensor, zero_point: Tensor, bias: Tensor | None = None
    ) -> Int8WeightOnlyLinear:
        """The module computing ``x @ ((codes - zero_point) * scale)^T + bias``: ``codes``
        integers ``[out, in]`` in -128..127 or 0..255, ``scale`` and ``zero_point`` ``[out]``
        (or ``[out, 1]``)."""
        if codes.dim() != 2 or codes.is_floating_point():
            raise UserInputError(
                f"codes must be an integer matrix [out, in], got {codes.dtype} {tuple(codes.shape)}"
            )
        out, inp = codes.shape
        scale = scale.detach().reshape(-1).to(torch.float32)
        zp = zero_point.detach().reshape(-1).to(torch.float32)
        if scale.numel() == 1:
            scale, zp = scale.expand(out), zp.expand(out)
        if scale.numel() != out or zp.numel() != out:
            raise UserInputError(
                f"scale/zero_point have {scale.numel()}/{zp.numel()} values; expected one per"
                f" output channel ({out})"
            )
        c = codes.to(torch.int32)
        lo, hi = (int(c.min()), int(c.max())) if c.numel() else (0, 0)
        if lo < -128 or hi > 255 or (lo < 0 and hi > 127):
            raise UserInputError(
                f"codes span {lo}..{hi}: Int8WeightOnlyLinear holds 8-bit codes (-128..127 or"
                " 0..255)"
            )
        if not bool(torch.isfinite(scale).all()):
            raise UserInputError(
                "scales hold NaN or Inf; re-quantize the weight from finite values"
            )
        shift = 128 if hi > 127 else 0
        mod = cls(inp, out, bias is not None)
        mod.weight_int8.copy_((c - shift).to(torch.int8))
        mod.weight_scale.copy_(scale)
        mod.zero_point.copy_(zp - shift)
        if bias is not None and mod.bias is not None:
            mod.bias.copy_(bias.detach().to(torch.float32))
        return mod.to(codes.device)

    @classmethod
    def from_state(cls, q: QuantState, bias: Tensor | None = None) -> Int8WeightOnlyLinear:
        """From an affine per-channel (or per-tensor) ``QuantState`` of 5 to 8 bits."""
        if q.scheme != "affine" or not 5 <= q.bits <= 8 or q.granularity == "per_group":
            raise UserInputError(
                f"Int8WeightOnlyLinear runs affine per-channel weights of 5 to 8 bits, got"
                f" {q.bits}-bit {q.scheme} {q.granularity}"
            )
        codes = to_matrix(q.codes)
        return cls.from_quantized(codes, q.scale, q.zero_point.to(torch.float32), bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features},"
            f" bias={self.bias is not None}"
        )

    def dequantized_weight(self) -> Tensor:
        """The float32 weight ``[out, in]`` the module represents."""
        w = self.weight_int8.to(torch.float32) - self.zero_point[:, None]
        return w * self.weight_scale[:, None]

    # --- kernels ----------------------------------------------------------------------------
    def _key(self) -> tuple[Any, ...]:
        w, s, z = self.weight_int8, self.weight_scale, self.zero_point
        return (w, s, z, w._version, s._version, z._version)

    @staticmethod
    def _same(a: tuple[Any, ...] | None, b: tuple[Any, ...]) -> bool:
        return a is not None and all(x is y for x, y in zip(a[:3], b[:3])) and a[3:] == b[3:]

    def _kernel_for(self, x: Tensor) -> Kernel:
        if self.kernel != "auto":
            return self.kernel
        return "int8pack" if x.device.type == "cpu" and int8pack_available() else "dequant"

    def _int8pack_plan(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor | None] | None:
        """``(codes, bf16 scale, float32 scale * zero point or None)`` when the int8 kernel runs
        ``x``, else None; cached with the buffers and their versions."""
        key = (*self._key(), self.kernel)
        if self._same(self._plan_key, key):
            return self._plan if x.device.type == "cpu" else None
        if self._kernel_for(x) != "int8pack":
            return None
        if x.device.type != "cpu" or not int8pack_available():
            raise ConfigError(
                "the int8pack kernel needs torch.ops.aten._weight_int8pack_mm on CPU; use"
                " kernel='dequant'"
            )
        zp = self.zero_point
        offset = self.weight_scale * zp if bool((zp != 0).any()) else None
        scale = self.weight_scale.to(torch.bfloat16)
        codes = F.pad(self.weight_int8, (0, -self.in_features % _K_MULTIPLE)).contiguous()
        self._plan = (codes, scale, offset)
        self._plan_key = key
        return self._plan

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if x2.shape[0] == 0:
            return x.new_zeros(*lead, self.out_features)
        plan = self._int8pack_plan(x2) if self.kernel != "dequant" else None
        if plan is not None:
            codes, scale, offset = plan
            xb = x2 if x2.dtype == torch.bfloat16 else x2.to(torch.bfloat16)
            if codes.shape[1] != self.in_features:
                xb = F.pad(xb, (0, codes.shape[1] - self.in_features))
            y = torch.ops.aten._weight_int8pack_mm(xb.contiguous(), codes, scale)
            if offset is not None:  # in float32: the two terms may nearly cancel
                xsum = xb.sum(dim=1, keepdim=True, dtype=torch.float32)
                y = y.to(torch.float32).sub_(xsum * offset)
            if self.bias is not None:
                y = y.to(torch.float32).add_(self.bias)
            return y.to(x.dtype).reshape(*lead, self.out_features)
        key = self._key()
        if self._dequant is None or not self._same(self._dequant[0], key):
            self._dequant = (key, self.dequantized_weight())
        y = F.linear(x2.to(torch.float32), self._dequant[1], self.bias)
        return y.to(x.dtype).reshape(*lead, self.out_features)
