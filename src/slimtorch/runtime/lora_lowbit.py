"""A low-rank adapter beside a frozen (quantized) Linear: ``y = linear(x) + scale * up(down(x))``.

``quantize.lora`` wraps the quantized Linears of a model in :class:`LoRALinear` and trains only
``down`` (``[rank, in]``) and ``up`` (``[out, rank]``, zero at the start, so the wrapped model
starts out computing exactly what the quantized one did). The wrapped ``linear`` keeps its
quantization state, so the artifact stores its codes as before and the adapter beside it (in
``dtype``, float16 by default, as QLoRA's adapters are kept). :func:`merge_adapter` folds the
adapter into the weight (``W + scale * up @ down``) for a caller that re-quantizes it.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from slimtorch.core.errors import ArtifactError

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


class LoRALinear(nn.Module):
    """``linear(x) + scale * up(down(x))`` with the adapter in its own dtype."""

    def __init__(self, linear: nn.Linear, rank: int, scale: float = 1.0) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"a low-rank adapter needs rank >= 1, got {rank}")
        self.linear = linear
        self.in_features = int(linear.in_features)
        self.out_features = int(linear.out_features)
        self.rank = int(rank)
        self.scale = float(scale)
        w = linear.weight
        self.down = nn.Linear(self.in_features, rank, bias=False, device=w.device, dtype=w.dtype)
        self.up = nn.Linear(rank, self.out_features, bias=False, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
            self.up.weight.zero_()

    def forward(self, x: Tensor) -> Tensor:
        y: Tensor = self.linear(x)
        a = self.down.weight
        delta = self.up(self.down(x.to(a.dtype)))
        return y + (delta * self.scale).to(y.dtype)

    def delta(self) -> Tensor:
        """``scale * up @ down`` as float32 ``[out, in]``."""
        up, down = self.up.weight.float(), self.down.weight.float()
        return (up @ down) * self.scale

    def config(self) -> dict[str, Any]:
        dtype = next(k for k, v in DTYPES.items() if v == self.down.weight.dtype)
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "bias": self.linear.bias is not None,
            "rank": self.rank,
            "scale": self.scale,
            "dtype": dtype,
        }

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> LoRALinear:
        """An empty module (a plain Linear inside) to ``load_state_dict`` into."""
        try:
            linear = nn.Linear(int(cfg["in_features"]), int(cfg["out_features"]), bool(cfg["bias"]))
            module = cls(linear, int(cfg["rank"]), float(cfg["scale"]))
            module.down.to(DTYPES[str(cfg["dtype"])])
            module.up.to(DTYPES[str(cfg["dtype"])])
            return module
        except (KeyError, TypeError, ValueError) as exc:
            raise ArtifactError(
                f"bad LoRALinear config {cfg!r} ({exc}); it needs in_features, out_features,"
                f" bias, rank, scale and dtype ({', '.join(DTYPES)}) - re-save the artifact"
            ) from None

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scale={self.scale:g}, dtype={self.down.weight.dtype}"


def merge_adapter(module: LoRALinear) -> Tensor:
    """The weight with the adapter folded in: ``W + scale * up @ down`` (float32)."""
    return module.linear.weight.detach().float() + module.delta().to(module.linear.weight.device)
