"""Int8 Linear with dynamic per-token activations: real int8 matrix products on CPU.

Weights are int8 codes ``[out, in]`` (symmetric, -127..127) with a float32 scale per output
channel. At run time every input row (token) is quantized with its own scale; the int8 product
is accumulated in int32 and rescaled to float32, plus bias.

Kernels, chosen per call (``kernel = "auto"``) or forced by setting ``module.kernel``:

* ``onednn`` (x86 CPU builds; the default there): oneDNN's int8 inner product
  (``torch.ops.onednn.qlinear_pointwise``, what Inductor uses for x86 int8). Activations are
  unsigned codes, asymmetric per token (``x ~ (u - zp) * s``, 0 exact); the per-token zero point
  is removed after the product with the weight's row sums: ``y = s * (ws * (u @ W^T) - zp * ws *
  rowsum(W)) + bias``. On CPUs without VNNI/AMX the u8*s8 pair sums of AVX2 saturate int16 past
  7-bit activations, so codes are ``0..127`` there (fbgemm and torchao call this reduce_range);
  with VNNI/AMX they are ``0..255``. Asymmetric codes keep post-GELU inputs (min ~ -0.17) at
  full resolution: on MiniLM, asymmetric 7-bit is as close to fp32 as symmetric 8-bit.
* ``int_mm``: ``torch._int_mm`` with symmetric signed 8-bit activations (``max|x| / 127``).
  Exact, but on CPU a reference kernel 20-50x slower than fp32 (torch 2.13, AVX2, measured), so
  it runs only where oneDNN is missing and on GPUs (rows padded to 17, odd widths in float64).

The state is ``weight_int8``, ``weight_scale`` and ``bias`` (buffers, in ``state_dict``); the
kernel's packed weight and row sums are derived, cached, and rebuilt whenever those buffers
change. Activation rounding is half-up and deterministic, so a reloaded module gives identical
outputs on the same machine.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slimtorch.runtime.shapes import LinearShape

Kernel = Literal["auto", "onednn", "int_mm"]

_W_QMAX = 127


def _cpu_has_vnni() -> bool:
    """True when int8 dot products accumulate in int32 without int16 saturation (VNNI/AMX)."""
    for probe in ("_is_vnni_supported", "_is_amx_tile_supported"):
        fn = getattr(torch.cpu, probe, None)
        if fn is not None and fn():
            return True
    return False


def onednn_available() -> bool:
    """Whether this torch build has oneDNN's int8 linear ops."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        return hasattr(torch.ops.onednn, "qlinear_pointwise")
    except (AttributeError, RuntimeError):
        return False


def quantize_weight_int8(w: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Symmetric per-output-channel int8 codes ``[out, in]`` and float32 scales ``[out]``."""
    w = w.detach().to(torch.float32)
    if mask is not None:
        w = w * mask.to(torch.float32)
    scale = w.abs().amax(dim=1) / _W_QMAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.round(w / scale[:, None]).clamp_(-_W_QMAX, _W_QMAX).to(torch.int8)
    return codes, scale


def _token_absmax(x: Tensor) -> Tensor:
    """Per-row ``max |x|`` of ``x`` ``[M, K]`` as ``[M, 1]``, floored away from zero."""
    # amax and amin separately: one fast pass each (torch.aminmax over dim=1 is ~10x slower)
    hi = x.amax(dim=1, keepdim=True)
    lo = x.amin(dim=1, keepdim=True)
    return torch.maximum(hi, lo.neg_()).clamp_min_(1e-30)


def quantize_tokens_u8(x: Tensor, qmax: int) -> tuple[Tensor, Tensor, Tensor]:
    """Asymmetric per-row codes of ``x`` ``[M, K]``: ``(codes uint8, scale, zero_point)``.

    ``x ~ (codes - zero_point) * scale``, codes in ``0..qmax`` (127 or 255), ``scale`` and the
    integral ``zero_point`` ``[M, 1]`` float32; 0 is exact. ``codes = trunc(x/s + zp + 0.5)``
    with ``zp = floor(-min/s)`` lies in ``0..qmax`` by construction, so no clamp pass is needed
    (round half-up; the row minimum may round up by less than one step). float32 -> uint8 casts
    are not vectorised in torch (6x slower than -> int8/int16), hence the detour.
    """
    hi = x.amax(dim=1, keepdim=True).clamp_min_(0)
    lo = x.amin(dim=1, keepdim=True).clamp_max_(0)
    scale = (hi - lo).clamp_min_(1e-30).div_(qmax)
    inv = scale.reciprocal()
    zero_point = lo.mul_(inv).neg_().floor_()
    v = torch.mul(x, inv).add_(zero_point + 0.5)  # in (-0.5, qmax + 0.5]: truncation is safe
    if qmax <= 127:
        return v.to(torch.int8).view(torch.uint8), scale, zero_point
    return v.to(torch.int16).to(torch.uint8), scale, zero_point


def _int_matmul(a: Tensor, b: Tensor) -> Tensor:
    """``a [M, K] int8 @ b [K, N] int8`` in int32, working around GPU shape limits of _int_mm."""
    if a.device.type == "cpu":
        return torch._int_mm(a, b)
    if a.shape[1] % 8 or b.shape[1] % 8:  # cuBLAS int8 needs widths that are multiples of 8
        return (a.double() @ b.double()).to(torch.int32)
    rows = a.shape[0]
    if rows <= 16:  # cuBLAS int8 needs more than 16 rows
        return torch._int_mm(F.pad(a, (0, 0, 0, 17 - rows)), b)[:rows]
    return torch._int_mm(a, b)


class Int8DynamicLinear(LinearShape, nn.Module):
    """``nn.Linear`` replacement with int8 weights and dynamic per-token int8 activations."""

    weight_int8: Tensor
    weight_scale: Tensor
    bias: Tensor | None

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.register_buffer(
            "weight_int8", torch.zeros(out_features, in_features, dtype=torch.int8)
        )
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        self.kernel: Kernel = "auto"
        self._act_qmax_u8 = 255 if _cpu_has_vnni() else 127
        self._packed: Tensor | None = None
        self._packed_key: tuple[Any, ...] | None = None
        self._colsum = torch.zeros(out_features)
        self._w_zero_point = torch.zeros(out_features, dtype=torch.long)

    # --- construction --------------------------------------------------------------------
    @classmethod
    def from_linear(cls, linear: nn.Linear, mask: Tensor | None = None) -> Int8DynamicLinear:
        """Quantize ``linear`` (its weight times ``mask``, if given) per output channel."""
        mod = cls(linear.in_features, linear.out_features, linear.bias is not None)
        codes, scale = quantize_weight_int8(linear.weight, mask)
        mod.weight_int8.copy_(codes)
        mod.weight_scale.copy_(scale)
        if linear.bias is not None and mod.bias is not None:
            mod.bias.copy_(linear.bias.detach().to(torch.float32))
        return mod.to(linear.weight.device)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"

    def __getstate__(self) -> dict[str, Any]:
        # The packed copy is an opaque oneDNN tensor: drop it (it is rebuilt on the next call).
        state = super().__getstate__()
        state = dict(state)
        state["_packed"] = None
        state["_packed_key"] = None
        return state

    def dequantized_weight(self) -> Tensor:
        """The float32 weight this module computes with."""
        return self.weight_int8.to(torch.float32) * self.weight_scale[:, None]

    # --- kernels ----------------------------------------------------------------------------
    def _kernel_for(self, x: Tensor) -> Kernel:
        if self.kernel != "auto":
            return self.kernel
        return "onednn" if x.device.type == "cpu" and onednn_available() else "int_mm"

    def _packed_weight(self, kernel: Kernel) -> tuple[Tensor, Tensor]:
        """The weight in the kernel's layout, and ``weight_scale * row sums`` (zero points)."""
        w, ws = self.weight_int8, self.weight_scale
        key = (kernel, w.device, w.data_ptr(), w._version, ws.data_ptr(), ws._version)
        if self._packed is None or self._packed_key != key:
            if kernel == "onednn":
                self._packed = torch.ops.onednn.qlinear_prepack(w.contiguous(), None)
            else:
                self._packed = w.t().contiguous()  # [in, out], the layout _int_mm reads fastest
            self._colsum = w.sum(dim=1, dtype=torch.int32).to(torch.float32) * ws
            self._packed_key = key
        return self._packed, self._colsum

    def _forward_onednn(self, x: Tensor) -> Tensor:
        xq, scale, zero_point = quantize_tokens_u8(x, self._act_qmax_u8)
        packed, colsum = self._packed_weight("onednn")
        # ws[n] * sum_k xq[m, k] * w[n, k]  (zero point handled below, per token)
        y: Tensor = torch.ops.onednn.qlinear_pointwise(
            xq, 1.0, 0, packed, self.weight_scale, self._w_zero_point,
            None, 1.0, 0, torch.float32, "none", [], "",
        )  # fmt: skip
        y.addcmul_(zero_point, colsum, value=-1)  # - zp[m] * ws[n] * sum_k w[n, k]
        if self.bias is None:
            return y.mul_(scale)
        return torch.addcmul(self.bias, y, scale, out=y)

    def _forward_int_mm(self, x: Tensor) -> Tensor:
        amax = _token_absmax(x)
        xq = torch.mul(x, _W_QMAX / amax).round_().to(torch.int8)
        acc = _int_matmul(xq, self._packed_weight("int_mm")[0])
        y = acc.to(torch.float32).mul_(amax.div_(_W_QMAX)).mul_(self.weight_scale)
        return y if self.bias is None else y.add_(self.bias)

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if x2.dtype != torch.float32:
            x2 = x2.to(torch.float32)
        if x2.shape[0] == 0:
            return x.new_zeros(*lead, self.out_features)
        x2 = x2.contiguous()
        if self._kernel_for(x2) == "onednn":
            y = self._forward_onednn(x2)
        else:
            y = self._forward_int_mm(x2)
        return y.reshape(*lead, self.out_features).to(x.dtype)
