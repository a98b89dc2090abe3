"""2:4 semi-structured sparse Linear: at most 2 non-zeros in every 4 consecutive input weights
of a row (what ``prune.nm n=2 m=4``, ``sparsegpt-2of4`` and ``wanda-2of4`` produce), run on the
sparse tensor cores of an Ampere-or-newer GPU through ``torch.sparse.to_sparse_semi_structured``.

State (portable): ``weight`` float32 ``[out, in]`` with the zeros in place, and ``bias``. The
compressed copy (values + metadata) is built from it on the first CUDA call in the input's
dtype and cached (rebuilt when the weight changes).

Kernels (``kernel = "auto"``; ``module.kernel`` forces one): ``semi_structured`` for float16 /
bfloat16 inputs on CUDA of compute capability >= 8.0 whose weight shape the kernel accepts
(``out % 32 == 0`` and ``in % 64 == 0``); ``dense`` (``F.linear`` with the zeros) elsewhere, with
one logged message on a GPU that cannot run it. The speed-up is measured by
``bench/device_check.py``.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slimtorch.core.errors import ConfigError, UserInputError
from slimtorch.graph.weights import replace_module
from slimtorch.runtime.device import fallback, semi_structured_available
from slimtorch.runtime.shapes import LinearShape

Kernel = Literal["auto", "semi_structured", "dense"]

MIN_ROWS, MIN_COLS = 32, 64  # float16/bfloat16 shape multiples of the semi-structured kernel
_HALF = (torch.float16, torch.bfloat16)


def is_2to4(weight: Tensor) -> bool:
    """Whether every 4 consecutive entries along the last axis hold at most 2 non-zeros."""
    if weight.dim() != 2 or weight.shape[1] % 4:
        return False
    groups = (weight.detach() != 0).reshape(weight.shape[0], -1, 4)
    return bool((groups.sum(dim=-1) <= 2).all())


def kernel_shape_ok(out_features: int, in_features: int) -> bool:
    """Whether the semi-structured kernel accepts a ``[out, in]`` half-precision weight."""
    return out_features % MIN_ROWS == 0 and in_features % MIN_COLS == 0


class SemiStructuredLinear(LinearShape, nn.Module):
    """``nn.Linear`` replacement for a 2:4-sparse weight."""

    weight: Tensor
    bias: Tensor | None

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        if in_features < 4 or in_features % 4 or out_features < 1:
            raise ConfigError(
                f"SemiStructuredLinear({in_features}, {out_features}): in_features must be a"
                " positive multiple of 4 (2:4 groups run along the input)"
            )
        self.in_features = in_features
        self.out_features = out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        self.kernel: Kernel = "auto"
        self._cache: tuple[tuple[Any, ...], Tensor] | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> SemiStructuredLinear:
        """The 2:4 module of ``linear``; refuses a weight that is not 2:4 sparse."""
        w = linear.weight.detach()
        if not is_2to4(w):
            raise UserInputError(
                f"Linear({linear.in_features}, {linear.out_features}) is not 2:4 sparse along its"
                " input; prune it first (recipe nm24, sparsegpt-2of4 or wanda-2of4)"
            )
        mod = cls(linear.in_features, linear.out_features, linear.bias is not None)
        mod.weight.copy_(w.to(torch.float32).cpu())
        if linear.bias is not None and mod.bias is not None:
            mod.bias.copy_(linear.bias.detach().to(torch.float32).cpu())
        return mod.to(w.device)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features},"
            f" bias={self.bias is not None}"
        )

    def _kernel_for(self, x: Tensor) -> Kernel:
        if self.kernel != "auto":
            return self.kernel
        if x.device.type != "cuda":
            return "dense"
        if not semi_structured_available(x.device):
            fallback("2:4 semi-structured", x.device, "needs compute capability >= 8.0")
            return "dense"
        if x.dtype not in _HALF:
            fallback("2:4 semi-structured", x.device, f"runs float16/bfloat16, not {x.dtype}")
            return "dense"
        if not kernel_shape_ok(self.out_features, self.in_features):
            shape = f"{self.out_features}x{self.in_features}"
            fallback("2:4 semi-structured", x.device, f"weight {shape} is not a multiple of 32x64")
            return "dense"
        return "semi_structured"

    def _weight_as(self, kernel: Kernel, dtype: torch.dtype) -> Tensor:
        w = self.weight
        key = (kernel, dtype, w._version, w.device)
        c = self._cache
        if c is not None and c[0][:4] == key and c[0][4] is w:
            return c[1]
        value = w.to(dtype)
        if kernel != "dense":
            try:
                value = torch.sparse.to_sparse_semi_structured(value)
            except (RuntimeError, ValueError) as exc:  # no cuSPARSELt/CUTLASS build, ...
                fallback("2:4 semi-structured", w.device, f"{type(exc).__name__}: {exc}")
        self._cache = ((*key, w), value)
        return value

    def prepare(self, dtype: torch.dtype) -> str:
        """Build the cached weight for ``dtype`` inputs on the module's device now (not in the
        first call); returns the kernel that will run them: ``semi_structured`` or ``dense``."""
        x = torch.empty(1, self.in_features, device=self.weight.device, dtype=dtype)
        value = self._weight_as(self._kernel_for(x), dtype)
        return "dense" if type(value) is torch.Tensor else "semi_structured"

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        kernel = self._kernel_for(x2)
        dtype = x.dtype if x.is_floating_point() else torch.float32
        w = self._weight_as(kernel, dtype)
        bias = self.bias.to(dtype) if self.bias is not None else None
        y = F.linear(x2.to(dtype), w, bias)
        return y.reshape(*lead, self.out_features)


def use_semi_structured(model: nn.Module) -> list[str]:
    """Swap every ``nn.Linear`` of ``model`` whose weight is 2:4 sparse along its input for a
    :class:`SemiStructuredLinear` on the same device; returns the swapped names."""
    swapped = []
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and name and is_2to4(module.weight):
            replace_module(model, name, SemiStructuredLinear.from_linear(module))
            swapped.append(name)
    return swapped
