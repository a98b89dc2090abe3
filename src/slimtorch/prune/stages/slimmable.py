"""The recipe stage ``train.slimmable``: train every width of a ``prune.reorder``-ed model together
(:func:`slimtorch.prune.slimmable.train_slimmable`). Its prefix ``train`` is an alias of this
folder (see :data:`slimtorch.core.methods.PREFIX_ALIASES`)."""

from __future__ import annotations

import logging

from pydantic import Field, field_validator
from torch import nn

from slimtorch.artifact.widths import available_widths
from slimtorch.calibrate.train import TrainOptions
from slimtorch.core.config import StageConfig
from slimtorch.core.errors import ConfigError
from slimtorch.core.methods import Run, register_method
from slimtorch.prune.slimmable import train_slimmable

log = logging.getLogger(__name__)


class SlimmableConfig(StageConfig):
    """Train every width of a ``prune.reorder``-ed model at once (needs --data)."""

    widths: list[float] = Field(
        default_factory=lambda: [1.0, 0.75, 0.5],
        description="the widths trained together; 1.0 (the full model) is always included",
    )
    train: TrainOptions = Field(default_factory=TrainOptions)

    @field_validator("widths")
    @classmethod
    def _in_range(cls, widths: list[float]) -> list[float]:
        bad = [w for w in widths if not 0 < w <= 1]
        if bad or not widths:
            raise ValueError(f"widths must be fractions in (0, 1], got {widths}")
        return sorted({1.0, *widths}, reverse=True)


def _check_reordered(model: nn.Module) -> None:
    if not available_widths(model):
        raise ConfigError(
            "train.slimmable trains the widths of a prune.reorder-ed model: put a"
            " `prune.reorder` stage before it (see examples/recipes/multiwidth.yaml)"
        )


@register_method(
    "train.slimmable",
    SlimmableConfig,
    "train every width of a prune.reorder-ed model together (one artifact, several widths)",
    needs_data=True,
)
def slimmable(model: nn.Module, config: SlimmableConfig, run: Run) -> None:
    _check_reordered(model)
    task = run.require_task("train.slimmable")
    losses = train_slimmable(model, task, run.ctx, config.train, config.widths)
    log.info("slimmable training at widths %s: loss %.4f -> %.4f", config.widths, losses[0],
             losses[-1])  # fmt: skip
