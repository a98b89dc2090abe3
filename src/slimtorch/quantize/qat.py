"""``quantize.qat``: quantization-aware fine-tuning with a straight-through estimator.

Each selected weight is parametrized (``torch.nn.utils.parametrize``): the module computes with
``fake_quantize(latent * mask)`` while gradients flow straight through to the latent weight
(times the mask, so pruned weights get no gradient and stay exactly 0). Because parametrized
weights are read through ``getattr``, this works for Linear, Conv, Embedding,
MultiheadAttention and LSTM/GRU (an RNN refreshes its ``_flat_weights`` when ``getattr`` returns
a new tensor). While training, the weights' states are held aside (so ``KeepMasks`` and the
trainer's freezing of quantized weights do not touch them); afterwards the parametrizations are
removed and the latent weights are quantized for real, keeping their masks.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from pydantic import Field
from torch import nn
from torch.nn.utils import parametrize

from slimtorch.calibrate.train import TrainOptions, train
from slimtorch.core.methods import Run, register_method
from slimtorch.formats.state import WeightState, apply_state, clear_state, get_state, set_state
from slimtorch.graph.weights import WeightRef, select_weights
from slimtorch.quantize.affine import fake_quantize, quantize_weight
from slimtorch.quantize.primitives import QuantSpec
from slimtorch.quantize.rtn import AffineOptions

log = logging.getLogger(__name__)


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


class QATConfig(AffineOptions):
    """Fine-tune with fake-quantized weights, then quantize them (same grid options as rtn)."""

    train: TrainOptions = Field(default_factory=lambda: TrainOptions(steps=200, lr=1e-4))


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


@register_method(
    "quantize.qat",
    QATConfig,
    "quantization-aware fine-tuning (fake quant + straight-through estimator), then int2..int8",
    needs_data=True,
)
def qat(model: nn.Module, config: QATConfig, run: Run) -> None:
    task = run.require_task("quantize.qat")
    refs = select_weights(model, config.targets, config.ignore)
    spec = config.spec()
    attached = attach_fake_quant(refs, spec)
    try:
        losses = train(model, task, run.ctx, config.train)
    except BaseException:
        detach_fake_quant(attached)
        for ref, old in attached:
            if old is not None:
                set_state(ref.module, ref.param, old)
        raise
    detach_fake_quant(attached)
    for ref, old in attached:
        mask = old.mask if old is not None else None
        extra = dict(old.extra) if old is not None else {}
        q = quantize_weight(ref.weight.detach(), spec, mask)
        apply_state(ref.module, ref.param, WeightState(mask=mask, quant=q, extra=extra))
    log.info(
        "quantize.qat: %d weights, %d steps, loss %.4f -> %.4f",
        len(attached),
        len(losses),
        losses[0],
        losses[-1],
    )
