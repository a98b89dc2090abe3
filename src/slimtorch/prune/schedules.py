"""Gradual magnitude pruning with the cubic schedule of Zhu & Gupta (2017), "To prune, or not
to prune" (arXiv:1710.01878):

    s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (n * dt)) ** 3      for t0 <= t <= t0 + n * dt

with ``s_i`` before ``t0`` and ``s_f`` after the end. Pruning happens only at the steps
``t0 + k * dt`` for ``k = 0 .. n`` (the event at ``t0`` prunes to ``s_i``, a no-op when it is 0),
so the mask grows fast early, while the weights are redundant, and slowly near the end.

:class:`GradualPruning` is a :class:`~slimtorch.calibrate.train.TrainingCallback`; in
slimtorch's own trainer pass it as ``train(..., callbacks=[GradualPruning(...)])``. In your own
loop, with ``step`` counting from 0::

    pruner = GradualPruning(CubicSchedule(0.0, 0.9, start_step=100, frequency=50, n=20),
                            targets=["Linear"])
    keep = KeepMasks()                      # slimtorch.calibrate.train.KeepMasks
    for step, (x, y) in enumerate(loader):  # at least schedule.end_step + 1 steps
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        keep.on_after_backward(model, step)  # optional: no gradient into pruned weights
        opt.step()
        pruner.on_step_end(model, step)      # prunes at the scheduled steps
        keep.on_step_end(model, step)        # pruned weights back to exactly zero

``keep.on_step_end`` is the same as :func:`slimtorch.prune.masking.reapply_masks(model)`; without
it, momentum in the optimizer moves pruned weights away from zero.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from slimtorch.calibrate.train import TrainingCallback
from slimtorch.core.errors import ConfigError
from slimtorch.graph.weights import WeightRef, select_weights
from slimtorch.prune.masking import Scope, magnitude_prune, sparsity_of

log = logging.getLogger(__name__)


def cubic_sparsity(
    step: int, initial: float, final: float, start_step: int, frequency: int, n: int
) -> float:
    """The Zhu & Gupta target sparsity at training step ``step`` (see module docstring)."""
    if step <= start_step:
        return initial
    span = n * frequency
    if step >= start_step + span:
        return final
    frac = (step - start_step) / span
    return final + (initial - final) * (1.0 - frac) ** 3


@dataclass(frozen=True)
class CubicSchedule:
    """Sparsity from ``initial`` to ``final`` over ``n`` pruning events ``frequency`` steps apart."""

    initial: float
    final: float
    start_step: int = 0
    frequency: int = 100
    n: int = 10

    def __post_init__(self) -> None:
        if not 0.0 <= self.initial <= self.final < 1.0:
            raise ConfigError(
                "gradual pruning needs 0 <= initial_sparsity <= final_sparsity < 1, got"
                f" initial={self.initial}, final={self.final}"
            )
        if self.start_step < 0 or self.frequency < 1 or self.n < 1:
            raise ConfigError(
                "gradual pruning needs start_step >= 0, frequency >= 1 and n >= 1, got"
                f" start_step={self.start_step}, frequency={self.frequency}, n={self.n}"
            )

    @property
    def end_step(self) -> int:
        """The step of the last pruning event, ``t0 + n * dt``."""
        return self.start_step + self.n * self.frequency

    def sparsity_at(self, step: int) -> float:
        return cubic_sparsity(
            step, self.initial, self.final, self.start_step, self.frequency, self.n
        )

    def is_pruning_step(self, step: int) -> bool:
        return (
            self.start_step <= step <= self.end_step
            and (step - self.start_step) % self.frequency == 0
        )


class ScheduledPruning(TrainingCallback):
    """What every pruning-while-training callback holds: the schedule, which weights
    (``targets``/``ignore``, as in recipes), the scope of the ranking, and ``history``:
    ``(step, scheduled, achieved)`` per pruning event."""

    def __init__(
        self,
        schedule: CubicSchedule,
        targets: Sequence[str] | None = None,
        ignore: Sequence[str] = (),
        scope: Scope = "layer",
    ) -> None:
        if scope not in ("layer", "global"):
            raise ConfigError(f"scope must be 'layer' or 'global', got {scope!r}")
        self.schedule = schedule
        self.targets = list(targets) if targets is not None else None
        self.ignore = list(ignore)
        self.scope: Scope = scope
        self.history: list[tuple[int, float, float]] = []


class GradualPruning(ScheduledPruning):
    """Magnitude-prunes the selected weights to the scheduled sparsity at each pruning step.

    Weights are selected by name (``targets``/``ignore``, as in recipes) when training begins,
    or at the first :meth:`on_step_end` in a hand-written loop. ``history`` records
    ``(step, scheduled, achieved)`` per pruning event.
    """

    def __init__(
        self,
        schedule: CubicSchedule,
        targets: Sequence[str] | None = None,
        ignore: Sequence[str] = (),
        scope: Scope = "layer",
    ) -> None:
        super().__init__(schedule, targets, ignore, scope)
        self.refs: list[WeightRef] | None = None

    def on_train_begin(self, model: nn.Module) -> None:
        self.refs = select_weights(model, self.targets, self.ignore)

    def on_step_end(self, model: nn.Module, step: int) -> None:
        if not self.schedule.is_pruning_step(step):
            return
        if self.refs is None:
            self.refs = select_weights(model, self.targets, self.ignore)
        target = self.schedule.sparsity_at(step)
        if target > 0:
            magnitude_prune(self.refs, target, self.scope)
        achieved = sparsity_of(self.refs)
        self.history.append((step, target, achieved))
        log.debug("gradual pruning step %d: target %.4f, achieved %.4f", step, target, achieved)

    def on_train_end(self, model: nn.Module) -> None:
        if self.refs is not None:
            log.info(
                "gradual pruning: %d events, final sparsity %.4f (target %.4f)",
                len(self.history),
                sparsity_of(self.refs),
                self.schedule.final,
            )
