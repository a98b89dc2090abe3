"""Simulated dynamic activation quantization in front of a Linear (W4A8, W4A4 quality studies).

:class:`ActQuantLinear` rounds every input row (token) to a ``bits``-bit grid of its own, then
runs the wrapped layer: per token, symmetric (``scale = clip * max|x| / (2^(b-1) - 1)``, codes
``-(2^(b-1) - 1) .. 2^(b-1) - 1``) or asymmetric (``[clip * min, clip * max]`` on ``0 .. 2^b - 1``
with an integral zero point). The arithmetic is exactly what an integer kernel with per-token
scales computes before its product, but the product itself runs in floating point: this module
measures quality, not speed (the real int8 path is :class:`~slimtorch.runtime.Int8DynamicLinear`).
The wrapped layer is the child ``linear``, quantized (weights) by any other stage.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from slimtorch.core.errors import ArtifactError

_TINY = 1e-8


def fake_quantize_tokens(x: Tensor, bits: int, symmetric: bool = True, clip: float = 1.0) -> Tensor:
    """``x`` rounded per row (last dimension) to a ``bits``-bit grid and dequantized."""
    x32 = x.to(torch.float32)
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        scale = (x32.abs().amax(dim=-1, keepdim=True) * clip).clamp_min(_TINY) / qmax
        return (torch.round(x32 / scale).clamp(-qmax, qmax) * scale).to(x.dtype)
    qmax = 2**bits - 1
    hi = (x32.amax(dim=-1, keepdim=True) * clip).clamp_min(0)
    lo = (x32.amin(dim=-1, keepdim=True) * clip).clamp_max(0)
    scale = (hi - lo).clamp_min(_TINY) / qmax
    zero = torch.round(-lo / scale)
    codes = (torch.round(x32 / scale) + zero).clamp(0, qmax)
    return ((codes - zero) * scale).to(x.dtype)


class ActQuantLinear(nn.Module):
    """``linear(q(x))`` with ``q`` per-token dynamic ``bits``-bit fake quantization."""

    def __init__(
        self, linear: nn.Module, bits: int, symmetric: bool = True, clip: float = 1.0
    ) -> None:
        super().__init__()
        if not 2 <= bits <= 8 or not 0 < clip <= 1:
            raise ValueError(f"bits={bits}, clip={clip}; use bits 2..8 and clip in (0, 1]")
        self.linear = linear
        self.bits = bits
        self.symmetric = symmetric
        self.clip = clip
        self.in_features = int(getattr(linear, "in_features", 0))
        self.out_features = int(getattr(linear, "out_features", 0))

    def forward(self, x: Tensor) -> Tensor:
        xq = fake_quantize_tokens(x, self.bits, self.symmetric, self.clip)
        return self.linear(xq)  # type: ignore[no-any-return]

    def config(self) -> dict[str, Any]:
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "bias": getattr(self.linear, "bias", None) is not None,
            "bits": self.bits,
            "symmetric": self.symmetric,
            "clip": self.clip,
        }

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> ActQuantLinear:
        """An empty module (a plain Linear inside) to ``load_state_dict`` into."""
        try:
            linear = nn.Linear(int(cfg["in_features"]), int(cfg["out_features"]), bool(cfg["bias"]))
            return cls(linear, int(cfg["bits"]), bool(cfg["symmetric"]), float(cfg["clip"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ArtifactError(
                f"bad ActQuantLinear config {cfg!r} ({exc}); it needs in_features, out_features,"
                " bias, bits, symmetric and clip - re-save the artifact"
            ) from None

    def extra_repr(self) -> str:
        kind = "symmetric" if self.symmetric else "asymmetric"
        return f"bits={self.bits}, {kind}, clip={self.clip}"
