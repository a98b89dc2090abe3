"""Recipe stage ``prune.movement``: hard movement pruning while fine-tuning on the run's task
(Sanh et al. 2020; the maths in :mod:`slimtorch.prune.movement`).

It is ``train.finetune`` with pruning: the same training loop and options, the same cubic
sparsity schedule as ``prune.gradual`` (magnitude), but the mask keeps the weights whose
score ``-sum_t W * dL/dW`` is highest, i.e. the ones fine-tuning moves away from zero.
"""

from __future__ import annotations

import logging

from torch import nn

from slimtorch.calibrate.train import train
from slimtorch.core.methods import Run, register_method
from slimtorch.prune.masking import log_sparsity
from slimtorch.prune.movement import MovementPruning
from slimtorch.prune.stages.unstructured import GradualConfig

log = logging.getLogger(__name__)


class MovementConfig(GradualConfig):
    """Movement pruning during fine-tuning (Sanh et al. 2020), cubic schedule as ``prune.gradual``.

    Pruning events at steps ``start_step + k * frequency``, ``k = 0 .. n``; each keeps the
    ``1 - s`` highest movement scores (pruned weights may come back). Training must run past
    the last event (``train.steps > start_step + n * frequency``); a ``start_step`` of about a
    tenth of the steps lets the scores settle first.
    """


@register_method(
    "prune.movement",
    MovementConfig,
    "movement pruning while fine-tuning on the task, cubic schedule (Sanh et al. 2020)",
    needs_data=True,
)
def prune_movement(model: nn.Module, config: MovementConfig, run: Run) -> None:
    task = run.require_task("prune.movement")
    pruner = MovementPruning(config.schedule(), config.targets, config.ignore, config.scope)
    losses = train(model, task, run.ctx, config.train, callbacks=[pruner])
    log.info("prune.movement: %d steps, loss %.4f -> %.4f", len(losses), losses[0], losses[-1])
    log_sparsity("prune.movement", pruner.refs)
