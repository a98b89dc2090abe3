"""Quantization-aware training: fake quantization with a straight-through estimator.

Each selected weight is parametrized (``torch.nn.utils.parametrize``): the module computes with
``fake_quantize(latent * mask)`` while gradients flow straight through to the latent weight
(times the mask, so pruned weights get no gradient and stay exactly 0). Because parametrized
weights are read through ``getattr``, this works for Linear, Conv, Embedding,
MultiheadAttention and LSTM/GRU (an RNN refreshes its ``_flat_weights`` when ``getattr`` returns
a new tensor). While training, the weights' states are held aside (so ``KeepMasks`` and the
trainer's freezing of quantized weights do not touch them); afterwards the parametrizations are
removed and the latent weights are quantized for real, keeping their masks (the recipe stage
``quantize.qat`` in :mod:`slimtorch.quantize.stages.qat`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from slimtorch.formats.state import WeightState, clear_state, get_state
from slimtorch.graph.weights import WeightRef
from slimtorch.quantize.affine import fake_quantize
from slimtorch.quantize.primitives import QuantSpec


class _StraightThrough(torch.autograd.Function):
    """Forward: the quantized values ``q``. Backward: the gradient to ``w``, masked."""

    @staticmethod
    def forward(
        ctx: Any, w: torch.Tensor, q: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        ctx.save_for_backward(mask if mask is not None else torch.empty(0))
        ctx.has_mask = mask is not None
        return q

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (mask,) = ctx.saved_tensors
        if ctx.has_mask:
            grad = grad * mask.to(grad.dtype)
        return grad, None, None


class FakeQuantize(nn.Module):
    """Parametrization: fake-quantize a weight on ``spec``'s grid, straight-through gradients."""

    mask: torch.Tensor | None

    def __init__(self, spec: QuantSpec, mask: torch.Tensor | None = None) -> None:
        super().__init__()
        self.spec = spec
        self.register_buffer(
            "mask", None if mask is None else mask.to(torch.bool), persistent=False
        )

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            q = fake_quantize(w, self.spec, self.mask)
        return _StraightThrough.apply(w, q, self.mask)  # type: ignore[no-any-return]


def attach_fake_quant(
    refs: list[WeightRef], spec: QuantSpec
) -> list[tuple[WeightRef, WeightState | None]]:
    """Parametrize every weight of ``refs``; returns their former states (now cleared)."""
    attached: list[tuple[WeightRef, WeightState | None]] = []
    for ref in refs:
        if parametrize.is_parametrized(ref.module, ref.param):
            continue  # already fake-quantized; leave it to its owner
        old = get_state(ref.module, ref.param)
        mask = old.mask if old is not None else None
        if mask is not None:
            with torch.no_grad():
                ref.weight.mul_(mask.to(ref.weight.dtype))
        clear_state(ref.module, ref.param)
        attached.append((ref, old))
        parametrize.register_parametrization(ref.module, ref.param, FakeQuantize(spec, mask))
    return attached


def detach_fake_quant(attached: list[tuple[WeightRef, WeightState | None]]) -> None:
    """Remove the parametrizations, leaving the latent (trained, unquantized) weights."""
    for ref, _ in attached:
        if parametrize.is_parametrized(ref.module, ref.param):
            parametrize.remove_parametrizations(ref.module, ref.param, leave_parametrized=False)
