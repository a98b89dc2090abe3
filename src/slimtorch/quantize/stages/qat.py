"""``quantize.qat``: fine-tune with fake-quantized weights (straight-through gradients, see
:mod:`slimtorch.quantize.qat`), then quantize them for real on the same grid as ``quantize.rtn``,
keeping every pruning mask."""

from __future__ import annotations

import logging

from pydantic import Field
from torch import nn

from slimtorch.calibrate.train import TrainOptions, train
from slimtorch.core.methods import Run, register_method
from slimtorch.formats.state import WeightState, apply_state, set_state
from slimtorch.graph.weights import select_weights
from slimtorch.quantize.affine import quantize_weight
from slimtorch.quantize.qat import attach_fake_quant, detach_fake_quant
from slimtorch.quantize.stages.rtn import AffineOptions

log = logging.getLogger(__name__)


class QATConfig(AffineOptions):
    """Fine-tune with fake-quantized weights, then quantize them (same grid options as rtn)."""

    train: TrainOptions = Field(default_factory=lambda: TrainOptions(steps=200, lr=1e-4))


@register_method(
    "quantize.qat",
    QATConfig,
    "quantization-aware fine-tuning (fake quant + straight-through estimator), then int2..int8",
    needs_data=True,
)
def qat(model: nn.Module, config: QATConfig, run: Run) -> None:
    task = run.require_task("quantize.qat")
    refs = select_weights(model, config.targets, config.ignore)
    spec = config.spec(refs=refs, stage="quantize.qat")
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
