"""Online Hadamard transform in front of a Linear (QuaRot's rotation of the ``down_proj`` input).

:class:`OnlineHadamardLinear` computes ``linear(x T)`` with ``T = F (x) S / sqrt(n)``-style
orthogonal transform of the input width ``n = m p``: ``F`` an orthonormal ``m x m`` Hadamard
(a buffer, saved with the module: Paley or 1x1) and ``S`` the normalised Sylvester Hadamard of
order ``p = 2^k``, applied as a fast Walsh-Hadamard transform (``p log p`` additions per row, no
``n x n`` matrix). The wrapped Linear's weight was multiplied by ``T`` when the transform was
inserted (``quantize.rotate``), so the function is unchanged while the Linear's *input* has no
outlier channels left: what per-token 4-bit activation quantization needs.

The wrapped layer is the child ``linear``: later stages quantize it like any Linear (GPTQ sees
the transformed inputs it multiplies), ``quantize.dynamic_int8`` may replace it, and the
artifact records this module as ``{"type": "OnlineHadamardLinear", "config": ...}`` with the
child's own entry after it.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from slimtorch.core.errors import ArtifactError


def fwht(x: Tensor) -> Tensor:
    """The normalised Walsh-Hadamard transform (Sylvester order) over the last dimension of
    ``x``, whose size must be a power of two: ``x S`` with ``S = H / sqrt(p)`` symmetric."""
    p = x.shape[-1]
    if p & (p - 1):
        raise ValueError(f"fwht needs a power-of-two width, got {p}")
    lead = x.shape[:-1]
    y = x.reshape(-1, p)
    h = 1
    while h < p:
        pairs = y.view(-1, p // (2 * h), 2, h)
        a, b = pairs[:, :, 0, :], pairs[:, :, 1, :]
        y = torch.stack((a + b, a - b), dim=2).reshape(-1, p)
        h *= 2
    return (y * (1.0 / math.sqrt(p))).reshape(*lead, p)


def hadamard_transform(x: Tensor, factor: Tensor) -> Tensor:
    """``x T`` for row vectors ``x [..., n]``, ``T = factor (x) S_p`` (Kronecker), ``factor``
    an orthonormal ``m x m`` matrix, ``S_p`` the normalised Sylvester matrix of ``p = n / m``."""
    m = factor.shape[0]
    n = x.shape[-1]
    if n % m:
        raise ValueError(f"width {n} is not a multiple of the Hadamard factor's order {m}")
    blocks = fwht(x.reshape(*x.shape[:-1], m, n // m))  # X S_p, X [..., m, p]
    if m > 1:  # F^T X S_p
        blocks = torch.einsum("ac,...ab->...cb", factor.to(blocks.dtype), blocks)
    return blocks.reshape(x.shape)


class OnlineHadamardLinear(nn.Module):
    """``linear(x T)``: an orthogonal Hadamard transform of the input, then the wrapped layer."""

    factor: Tensor

    def __init__(self, linear: nn.Module, factor: Tensor) -> None:
        super().__init__()
        n = int(getattr(linear, "in_features", 0))
        m = int(factor.shape[0])
        if factor.dim() != 2 or factor.shape[1] != m or n % m or (n // m) & (n // m - 1):
            raise ValueError(
                f"an online Hadamard of width {n} needs an m x m factor with {n} / m a power of"
                f" two, got {tuple(factor.shape)}"
            )
        self.linear = linear
        self.in_features = n
        self.out_features = int(getattr(linear, "out_features", 0))
        self.register_buffer("factor", factor.detach().to(torch.float32).clone())

    def transform(self, x: Tensor) -> Tensor:
        """``x T``: what the wrapped layer receives."""
        return hadamard_transform(x, self.factor)

    def matrix(self, dtype: torch.dtype = torch.float64) -> Tensor:
        """The dense ``n x n`` transform ``T`` (orthogonal)."""
        eye = torch.eye(self.in_features, dtype=dtype, device=self.factor.device)
        return hadamard_transform(eye, self.factor.to(dtype))

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(self.transform(x))  # type: ignore[no-any-return]

    def config(self) -> dict[str, Any]:
        """What :meth:`from_config` needs (the factor itself is a buffer in the state dict)."""
        bias = getattr(self.linear, "bias", None) is not None
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "bias": bias,
            "factor": int(self.factor.shape[0]),
        }

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> OnlineHadamardLinear:
        """An empty module (a plain Linear inside) to ``load_state_dict`` into."""
        try:
            linear = nn.Linear(int(cfg["in_features"]), int(cfg["out_features"]), bool(cfg["bias"]))
            m = int(cfg["factor"])
            return cls(linear, torch.zeros(m, m))
        except (KeyError, TypeError, ValueError) as exc:
            raise ArtifactError(
                f"bad OnlineHadamardLinear config {cfg!r} ({exc}); it needs in_features,"
                " out_features, bias and factor - re-save the artifact"
            ) from None

    def extra_repr(self) -> str:
        return f"width={self.in_features}, factor={int(self.factor.shape[0])}"
