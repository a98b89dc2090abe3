"""The recipe stage ``train.finetune``: plain fine-tuning on the run's task with the shared
training loop (:func:`slimtorch.calibrate.train.train`). Its prefix ``train`` is an alias of
this folder (see :data:`slimtorch.core.methods.PREFIX_ALIASES`)."""

from __future__ import annotations

import logging

from pydantic import Field
from torch import nn

from slimtorch.calibrate.train import TrainOptions, train
from slimtorch.core.config import StageConfig
from slimtorch.core.methods import Run, register_method

log = logging.getLogger(__name__)


class FinetuneConfig(StageConfig):
    """Plain fine-tuning on the task's training data; masks stay, quantized weights stay frozen."""

    train: TrainOptions = Field(default_factory=TrainOptions)


@register_method(
    "train.finetune",
    FinetuneConfig,
    "fine-tune on --data, keeping pruned weights at zero",
    needs_data=True,
)
def finetune(model: nn.Module, config: FinetuneConfig, run: Run) -> None:
    losses = train(model, run.require_task("train.finetune"), run.ctx, config.train)
    log.info("fine-tuned %d steps: loss %.4f -> %.4f", len(losses), losses[0], losses[-1])
