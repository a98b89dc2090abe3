"""Recipe methods for unstructured and N:M pruning: typed configs plus ``apply`` functions.

Each stage selects weights with ``targets``/``ignore``, masks them (combining with earlier
masks), refuses weights that are already quantized, and logs the sparsity it reached.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any, Literal

from pydantic import Field, model_validator
from torch import nn

from slimtorch.calibrate.train import TrainOptions, train
from slimtorch.core.config import StageConfig
from slimtorch.core.errors import ConfigError
from slimtorch.core.methods import Run, register_method
from slimtorch.graph.weights import WeightRef, select_weights
from slimtorch.prune.criteria import probabilistic_mask, random_mask, threshold_mask
from slimtorch.prune.masking import log_sparsity, magnitude_prune, prune_each
from slimtorch.prune.nm import input_size, nm_mask
from slimtorch.prune.schedules import CubicSchedule, GradualPruning

log = logging.getLogger(__name__)


def _sparsity() -> Any:
    return Field(default=0.5, ge=0, lt=1, description="fraction of weights set to zero, in [0, 1)")


def _refs(model: nn.Module, config: StageConfig) -> list[WeightRef]:
    return select_weights(model, config.targets, config.ignore)


class MagnitudeConfig(StageConfig):
    """Zero the smallest-magnitude weights, per layer or with one threshold across layers."""

    sparsity: float = _sparsity()
    scope: Literal["layer", "global"] = "layer"


@register_method("prune.magnitude", MagnitudeConfig, "zero the smallest |w|, per layer or global")
def prune_magnitude(model: nn.Module, config: MagnitudeConfig, run: Run) -> None:
    refs = _refs(model, config)
    magnitude_prune(refs, config.sparsity, config.scope)
    log_sparsity("prune.magnitude", refs)


class ThresholdConfig(StageConfig):
    """Zero ``|w| < value``, or ``|w| < std_k * std(w)`` per tensor; set exactly one."""

    value: float | None = Field(default=None, ge=0, description="absolute magnitude threshold")
    std_k: float | None = Field(
        default=None, ge=0, description="threshold in units of the weight's std"
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> ThresholdConfig:
        if (self.value is None) == (self.std_k is None):
            raise ValueError(
                "set exactly one of `value` (absolute threshold) or `std_k` (multiple of the"
                f" weight std); got value={self.value}, std_k={self.std_k}"
            )
        return self


@register_method(
    "prune.threshold",
    ThresholdConfig,
    "zero |w| below a value or k standard deviations",
    example={"std_k": 1.0},
)
def prune_threshold(model: nn.Module, config: ThresholdConfig, run: Run) -> None:
    refs = _refs(model, config)
    prune_each(refs, lambda w, prior, _r: threshold_mask(w, config.value, config.std_k, prior))
    log_sparsity("prune.threshold", refs)


class RandomConfig(StageConfig):
    """Zero each weight independently with probability ``rate`` (a baseline; seeded)."""

    rate: float = Field(default=0.5, ge=0, lt=1, description="probability of pruning each weight")


@register_method(
    "prune.random", RandomConfig, "zero each weight with probability `rate` (baseline)"
)
def prune_random(model: nn.Module, config: RandomConfig, run: Run) -> None:
    refs = _refs(model, config)
    gen = run.ctx.generator()
    prune_each(refs, lambda w, prior, _r: random_mask(w, config.rate, gen, prior))
    log_sparsity("prune.random", refs)


class ProbabilisticConfig(StageConfig):
    """Keep an exact count of weights, sampled with probability proportional to ``|w|**power``."""

    sparsity: float = _sparsity()
    power: float = Field(
        default=1.0, ge=0, description="0 = uniform; larger = closer to magnitude pruning"
    )


@register_method(
    "prune.probabilistic",
    ProbabilisticConfig,
    "keep weights sampled with probability ~ |w|**power (exact count, seeded)",
)
def prune_probabilistic(model: nn.Module, config: ProbabilisticConfig, run: Run) -> None:
    refs = _refs(model, config)
    gen = run.ctx.generator()
    prune_each(
        refs, lambda w, prior, _r: probabilistic_mask(w, config.sparsity, gen, config.power, prior)
    )
    log_sparsity("prune.probabilistic", refs)


class NMConfig(StageConfig):
    """Keep the ``n`` largest of every ``m`` consecutive input weights (2:4 for sparse tensor cores)."""

    n: int = Field(default=2, ge=1)
    m: int = Field(default=4, ge=2)
    skip_incompatible: bool = Field(
        default=False,
        description="leave layers whose input size is not a multiple of m dense (with a warning)"
        " instead of failing",
    )

    @model_validator(mode="after")
    def _n_below_m(self) -> NMConfig:
        if self.n >= self.m:
            raise ValueError(
                f"`n` must be smaller than `m` (got n={self.n}, m={self.m}); e.g. n=2, m=4"
            )
        return self


@register_method("prune.nm", NMConfig, "N:M semi-structured sparsity along the input dimension")
def prune_nm(model: nn.Module, config: NMConfig, run: Run) -> None:
    refs = _refs(model, config)
    if config.skip_incompatible:
        skipped = [r.name for r in refs if input_size(r.weight) % config.m]
        if skipped:
            warnings.warn(
                f"prune.nm {config.n}:{config.m}: left dense (input size not a multiple of"
                f" {config.m}): {', '.join(skipped)}",
                stacklevel=2,
            )
        refs = [r for r in refs if not input_size(r.weight) % config.m]
        if not refs:
            raise ConfigError(
                f"prune.nm: no selected layer has an input size divisible by {config.m}"
            )
    prune_each(
        refs, lambda w, prior, r: nm_mask(w, config.n, config.m, r.module_name or r.name, prior)
    )
    log_sparsity(f"prune.nm {config.n}:{config.m}", refs)


class GradualConfig(StageConfig):
    """Magnitude pruning during fine-tuning on the cubic schedule of Zhu & Gupta (2017).

    Pruning events at steps ``start_step + k * frequency``, ``k = 0 .. n``; training must run past
    the last one (``train.steps > start_step + n * frequency``).
    """

    initial_sparsity: float = Field(default=0.0, ge=0, lt=1)
    final_sparsity: float = Field(default=0.8, ge=0, lt=1)
    start_step: int = Field(default=0, ge=0, description="t0: first pruning step")
    frequency: int = Field(default=10, ge=1, description="dt: steps between pruning events")
    n: int = Field(default=10, ge=1, description="number of pruning events after start_step")
    scope: Literal["layer", "global"] = "layer"
    train: TrainOptions = Field(default_factory=lambda: TrainOptions.model_validate({}))

    @model_validator(mode="after")
    def _consistent(self) -> GradualConfig:
        if self.initial_sparsity > self.final_sparsity:
            raise ValueError(
                f"`initial_sparsity` ({self.initial_sparsity}) must not exceed `final_sparsity`"
                f" ({self.final_sparsity})"
            )
        last = self.start_step + self.n * self.frequency
        if self.train.steps <= last:
            raise ValueError(
                f"`train.steps` ({self.train.steps}) must exceed the last pruning step"
                f" start_step + n * frequency = {last}; set train.steps >= {last + 1}"
                " (more leaves time to recover), or lower `n`, `frequency` or `start_step`"
            )
        return self

    def schedule(self) -> CubicSchedule:
        return CubicSchedule(
            self.initial_sparsity, self.final_sparsity, self.start_step, self.frequency, self.n
        )


@register_method(
    "prune.gradual",
    GradualConfig,
    "magnitude pruning during fine-tuning, cubic schedule (Zhu & Gupta 2017)",
    needs_data=True,
)
def prune_gradual(model: nn.Module, config: GradualConfig, run: Run) -> None:
    task = run.require_task("prune.gradual")
    pruner = GradualPruning(config.schedule(), config.targets, config.ignore, config.scope)
    losses = train(model, task, run.ctx, config.train, callbacks=[pruner])
    log.info("prune.gradual: %d steps, loss %.4f -> %.4f", len(losses), losses[0], losses[-1])
    if pruner.refs is not None:
        log_sparsity("prune.gradual", pruner.refs)
