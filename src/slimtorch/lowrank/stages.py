"""The recipe stage ``lowrank.svd``: factor the selected layers by plain or data-whitened SVD
(:func:`~slimtorch.lowrank.factor.lowrank_model`), then optionally fine-tune on --data."""

from __future__ import annotations

import logging

from torch import nn

from slimtorch.calibrate.train import train
from slimtorch.core.methods import Run, register_method
from slimtorch.lowrank.factor import LowRankConfig, lowrank_model

log = logging.getLogger(__name__)


@register_method(
    "lowrank.svd",
    LowRankConfig,
    "factor Linear/Conv2d weights by truncated SVD (optionally fine-tune)",
)
def lowrank_svd(model: nn.Module, config: LowRankConfig, run: Run) -> None:
    needs = config.finetune is not None or config.whiten
    task = run.require_task("lowrank.svd (with finetune or whiten)") if needs else None
    lowrank_model(model, config, task, run.ctx)
    if task is not None and config.finetune is not None:
        losses = train(model, task, run.ctx, config.finetune)
        log.info(
            "lowrank.svd fine-tuned %d steps: loss %.4f -> %.4f", len(losses), losses[0], losses[-1]
        )
