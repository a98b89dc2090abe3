"""Low-rank replacements of Linear and Conv2d: two smaller layers in sequence.

``LowRankLinear``: ``down = Linear(in, r, bias=False)`` then ``up = Linear(r, out, bias)``.
``LowRankConv2d``: ``down = Conv2d(in, r, kernel, stride, padding, dilation, bias=False)`` then
``up = Conv2d(r, out, 1, bias)``. The inner layers are plain ``nn.Linear``/``nn.Conv2d``, so
pruning and quantization stages that run after ``lowrank.svd`` find and compress them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from slimtorch.core.errors import ArtifactError


def _bad_config(kind: str, cfg: dict[str, Any], exc: Exception, needs: str) -> ArtifactError:
    return ArtifactError(
        f"bad {kind} config {cfg!r} ({exc}); it needs {needs} - re-save the artifact"
    )


class LowRankLinear(nn.Module):
    """``x -> up(down(x))`` with ``up.weight @ down.weight`` approximating a Linear weight."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        self.down = nn.Linear(in_features, rank, bias=False)
        self.up = nn.Linear(rank, out_features, bias=bias)

    @classmethod
    def from_factors(cls, a: Tensor, b: Tensor, bias: Tensor | None) -> LowRankLinear:
        """The module computing ``x @ (a @ b).T + bias`` for ``a [out, r]``, ``b [r, in]``."""
        mod = cls(b.shape[1], a.shape[0], a.shape[1], bias is not None)
        mod = mod.to(device=a.device, dtype=a.dtype)
        with torch.no_grad():
            mod.down.weight.copy_(b)
            mod.up.weight.copy_(a)
            if bias is not None and mod.up.bias is not None:
                mod.up.bias.copy_(bias)
        return mod

    def config(self) -> dict[str, Any]:
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "rank": self.rank,
            "bias": self.up.bias is not None,
        }

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> LowRankLinear:
        try:
            return cls(
                int(cfg["in_features"]),
                int(cfg["out_features"]),
                int(cfg["rank"]),
                bool(cfg["bias"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise _bad_config(
                "LowRankLinear", cfg, exc, "in_features, out_features, rank, bias"
            ) from None

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"

    def forward(self, x: Tensor) -> Tensor:
        y: Tensor = self.up(self.down(x))
        return y


_CONV_KEYS = ("kernel_size", "stride", "padding", "dilation")


class LowRankConv2d(nn.Module):
    """A ``kernel``-sized Conv2d to ``rank`` channels, then a 1x1 Conv2d to ``out`` channels."""

    def __init__(
        self, in_channels: int, out_channels: int, rank: int, conv: dict[str, Any], bias: bool
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.rank = rank
        self.conv = {k: list(v) if isinstance(v, tuple) else v for k, v in conv.items()}
        spatial: dict[str, Any] = {
            k: tuple(v) if isinstance(v, list) else v for k, v in self.conv.items()
        }
        self.down = nn.Conv2d(in_channels, rank, bias=False, **spatial)
        self.up = nn.Conv2d(rank, out_channels, 1, bias=bias)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, a: Tensor, b: Tensor) -> LowRankConv2d:
        """Factor ``conv`` given ``a [out, r]`` and ``b [r, in*kh*kw]`` of its weight matrix."""
        spatial = {k: getattr(conv, k) for k in _CONV_KEYS}
        spatial["padding_mode"] = conv.padding_mode
        rank = a.shape[1]
        mod = cls(conv.in_channels, conv.out_channels, rank, spatial, conv.bias is not None)
        mod = mod.to(device=a.device, dtype=a.dtype)
        with torch.no_grad():
            mod.down.weight.copy_(b.reshape(rank, *conv.weight.shape[1:]))
            mod.up.weight.copy_(a.reshape(conv.out_channels, rank, 1, 1))
            if conv.bias is not None and mod.up.bias is not None:
                mod.up.bias.copy_(conv.bias)
        return mod

    def config(self) -> dict[str, Any]:
        return {
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "rank": self.rank,
            "conv": self.conv,
            "bias": self.up.bias is not None,
        }

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> LowRankConv2d:
        try:
            return cls(
                int(cfg["in_channels"]),
                int(cfg["out_channels"]),
                int(cfg["rank"]),
                dict(cfg["conv"]),
                bool(cfg["bias"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise _bad_config(
                "LowRankConv2d", cfg, exc, "in_channels, out_channels, rank, conv, bias"
            ) from None

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, rank={self.rank}"

    def forward(self, x: Tensor) -> Tensor:
        y: Tensor = self.up(self.down(x))
        return y
