"""Float8 (e4m3) Linear: weights stored as float8 e4m3 with one float32 scale per output row.

    w[o, :] = float8_e4m3(w[o, :] / scale[o]) * scale[o]        scale[o] = max|w[o, :]| / 448

State (buffers, portable): ``weight_fp8`` uint8 ``[out, in]`` (the bit pattern of
``torch.float8_e4m3fn``: a uint8 buffer survives every safetensors reader), ``weight_scale``
float32 ``[out]`` and ``bias``. ``activations`` says how the product runs:

* ``"none"`` (weight-only, W8A16): the weight is dequantized once into the activation dtype
  and cached; half the bytes of a bfloat16 checkpoint on disk, the dense product's speed.
* ``"dynamic"`` (W8A8): each row (token) of the input is scaled by ``max|x| / 448`` into e4m3
  and ``torch._scaled_mm`` runs both float8 operands with row-wise scales, bfloat16 out.

Kernels (``kernel = "auto"``; set ``module.kernel`` to force one): ``scaled_mm`` for
``activations="dynamic"`` on a CUDA device of compute capability >= 8.9 (Ada, Hopper: older
GPUs fall back to ``dequant`` with one logged message); ``dequant`` elsewhere. With
``activations="dynamic"`` the ``dequant`` kernel simulates the W8A8 product exactly: each
input row is rounded to e4m3 on its own scale (:func:`fake_quantize_rows_fp8`) before the
dense product, so a CPU evaluation measures what the float8 kernel computes. torch's CPU build
also runs ``_scaled_mm`` (force ``kernel = "scaled_mm"``): the tests check the W8A8 arithmetic
there. ``_scaled_mm`` wants ``K`` and ``N`` multiples of 16: both are zero-padded.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slimtorch.core.errors import ArtifactError, ConfigError, UserInputError
from slimtorch.runtime.device import fallback, scaled_mm_available

Activations = Literal["none", "dynamic"]
Kernel = Literal["auto", "scaled_mm", "dequant"]

E4M3_MAX = 448.0
_TINY = 1e-12
_MULTIPLE = 16


def fp8_dtype() -> torch.dtype:
    """``torch.float8_e4m3fn``; a clear error on a torch without it."""
    dtype = getattr(torch, "float8_e4m3fn", None)
    if dtype is None:
        raise ConfigError("this torch has no float8_e4m3fn; fp8 layers need torch >= 2.1")
    return dtype


def quantize_rows_fp8(x: Tensor) -> tuple[Tensor, Tensor]:
    """``(float8 e4m3 [rows, k], float32 scale [rows, 1])`` with ``x ~ codes * scale``."""
    x32 = x.to(torch.float32)
    scale = x32.abs().amax(dim=1, keepdim=True).clamp_min(_TINY) / E4M3_MAX
    codes = (x32 / scale).clamp(-E4M3_MAX, E4M3_MAX).to(fp8_dtype())
    return codes, scale


def fake_quantize_rows_fp8(x: Tensor) -> Tensor:
    """``x`` rounded to e4m3 per row (``max|x| / 448`` scales), in ``x``'s dtype."""
    codes, scale = quantize_rows_fp8(x)
    return (codes.to(torch.float32) * scale).to(x.dtype)


class Fp8Linear(nn.Module):
    """``nn.Linear`` replacement with float8 e4m3 weights (per-row scales)."""

    weight_fp8: Tensor
    weight_scale: Tensor
    bias: Tensor | None

    def __init__(
        self, in_features: int, out_features: int, bias: bool = True, activations: str = "none"
    ) -> None:
        super().__init__()
        if in_features < 1 or out_features < 1:
            raise ConfigError(f"Fp8Linear({in_features}, {out_features}): sizes must be positive")
        if activations not in ("none", "dynamic"):
            raise ConfigError(f"activations={activations!r}; use 'none' (W8A16) or 'dynamic'")
        self.in_features = in_features
        self.out_features = out_features
        self.activations: Activations = "dynamic" if activations == "dynamic" else "none"
        self.register_buffer(
            "weight_fp8", torch.zeros(out_features, in_features, dtype=torch.uint8)
        )
        self.register_buffer("weight_scale", torch.ones(out_features))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        self.kernel: Kernel = "auto"
        self._cache: tuple[tuple[Any, ...], Any] | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, activations: str = "none") -> Fp8Linear:
        """The float8 copy of ``linear`` (its device; weights must be finite)."""
        w = linear.weight.detach()
        if not bool(torch.isfinite(w).all()):
            raise UserInputError("the Linear's weight holds NaN or Inf; fp8 needs finite weights")
        mod = cls(linear.in_features, linear.out_features, linear.bias is not None, activations)
        codes, scale = quantize_rows_fp8(w)
        mod.weight_fp8.copy_(codes.view(torch.uint8).cpu())
        mod.weight_scale.copy_(scale.reshape(-1).cpu())
        if linear.bias is not None and mod.bias is not None:
            mod.bias.copy_(linear.bias.detach().to(torch.float32).cpu())
        return mod.to(w.device)

    def config(self) -> dict[str, Any]:
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "bias": self.bias is not None,
            "activations": self.activations,
        }

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> Fp8Linear:
        try:
            return cls(
                int(cfg["in_features"]),
                int(cfg["out_features"]),
                bool(cfg["bias"]),
                str(cfg.get("activations", "none")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ArtifactError(
                f"bad Fp8Linear config {cfg!r} ({exc}); it needs in_features, out_features and"
                " bias - re-save the artifact"
            ) from None

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features},"
            f" bias={self.bias is not None}, activations={self.activations}"
        )

    def dequantized_weight(self) -> Tensor:
        """The float32 weight ``[out, in]`` the module represents."""
        codes = self.weight_fp8.view(fp8_dtype()).to(torch.float32)
        return codes * self.weight_scale.unsqueeze(1)

    # --- kernels ----------------------------------------------------------------------------
    def _kernel_for(self, x: Tensor) -> Kernel:
        if self.kernel != "auto":
            return self.kernel
        if self.activations != "dynamic" or x.device.type != "cuda":
            return "dequant"
        if not scaled_mm_available(x.device):
            fallback("fp8 _scaled_mm", x.device, "needs compute capability >= 8.9")
            return "dequant"
        return "scaled_mm"

    def _cached(self, kind: str, dtype: torch.dtype) -> Any:
        w, s = self.weight_fp8, self.weight_scale
        key = (kind, dtype, w._version, s._version, w.device, w, s)
        c = self._cache
        if c is not None and c[0][:5] == key[:5] and c[0][5] is w and c[0][6] is s:
            return c[1]
        if kind == "dequant":
            value: Any = self.dequantized_weight().to(dtype)
        else:
            n_pad, k_pad = -self.out_features % _MULTIPLE, -self.in_features % _MULTIPLE
            codes = F.pad(w, (0, k_pad, 0, n_pad)).view(fp8_dtype())  # zeros: +0.0 in e4m3
            scale = F.pad(s.to(torch.float32), (0, n_pad), value=1.0).reshape(1, -1)
            value = (codes.contiguous(), scale.contiguous())
        self._cache = (key, value)
        return value

    def _scaled_mm(self, x2: Tensor) -> Tensor:
        codes, w_scale = self._cached("scaled_mm", torch.float32)
        k_pad = codes.shape[1] - self.in_features
        xq, x_scale = quantize_rows_fp8(F.pad(x2, (0, k_pad)) if k_pad else x2)
        y = torch._scaled_mm(
            xq.contiguous(),
            codes.t(),  # column-major [K, N], as _scaled_mm wants its second operand
            scale_a=x_scale.contiguous(),
            scale_b=w_scale,
            out_dtype=torch.bfloat16,
        )
        return y[:, : self.out_features]

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if x2.shape[0] == 0:
            return x.new_zeros(*lead, self.out_features)
        if self._kernel_for(x2) == "scaled_mm":
            y = self._scaled_mm(x2).to(torch.float32)
            if self.bias is not None:
                y = y + self.bias
        else:
            dtype = x.dtype if x.dtype in (torch.float16, torch.bfloat16) else torch.float32
            w = self._cached("dequant", dtype)
            bias = self.bias.to(dtype) if self.bias is not None else None
            xd = x2.to(dtype)
            if self.activations == "dynamic":
                xd = fake_quantize_rows_fp8(xd)
            y = F.linear(xd, w, bias)
        return y.to(x.dtype).reshape(*lead, self.out_features)
