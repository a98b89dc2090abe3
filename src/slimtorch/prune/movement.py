"""Movement pruning (Sanh, Wolf & Rush, NeurIPS 2020, arXiv:2005.07683): while fine-tuning a
pretrained model on a new task, prune the weights that move towards zero, not the small ones.

Hard movement pruning. Every selected weight ``W`` has a score ``S`` (zeros at the start of
training) that accumulates, after every backward pass,

    S <- S - W * dL/dW'

where ``W' = W * M`` is the masked weight the forward pass used and ``W`` the unmasked value
(the straight-through estimator of the paper: a pruned weight still gets a gradient on ``W'``,
so its score keeps moving). ``S > 0`` means gradient descent pushes ``W`` away from zero. At each
pruning event the mask keeps the ``1 - s`` highest scores (per weight tensor, or one threshold
across tensors with ``scope="global"``), ``s`` from the cubic schedule of
:class:`slimtorch.prune.schedules.CubicSchedule`. A pruned weight receives no update, its value
is kept aside, and it comes back with that value if its score climbs into the top again.
Positions an earlier stage pruned stay pruned.

Movement differs from magnitude when a large weight is shrinking on the new task (magnitude keeps
it, movement drops it) or a small one is growing. Soft movement (a learned threshold with an L1
penalty on the scores) is not implemented.

:class:`MovementPruning` is a :class:`~slimtorch.calibrate.train.TrainingCallback`; in slimtorch
pass it as ``train(..., callbacks=[MovementPruning(schedule)])``; the recipe stage is
``prune.movement``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace

import torch
from torch import nn

from slimtorch.core.errors import ConfigError
from slimtorch.formats.state import WeightState, apply_state, get_state
from slimtorch.graph.weights import WeightRef, select_weights
from slimtorch.prune.criteria import lowest_k_mask, num_pruned
from slimtorch.prune.masking import Scope, current, sparsity_of
from slimtorch.prune.schedules import CubicSchedule, ScheduledPruning

log = logging.getLogger(__name__)


def accumulate_movement(scores: torch.Tensor, weight: torch.Tensor, grad: torch.Tensor) -> None:
    """``scores -= weight * grad`` in place (float32 scores; ``weight`` unmasked)."""
    scores.sub_(weight.detach().to(scores.dtype) * grad.detach().to(scores.dtype))


def _ranked(scores: torch.Tensor, allowed: torch.Tensor | None) -> torch.Tensor:
    """Scores with positions ``allowed`` forbids ranked below every other one."""
    s = scores.detach().to(torch.float32)
    return s if allowed is None else s.masked_fill(~allowed.to(torch.bool), float("-inf"))


def movement_masks(
    scores: Sequence[torch.Tensor],
    sparsity: float,
    scope: Scope = "layer",
    allowed: Sequence[torch.Tensor | None] | None = None,
) -> list[torch.Tensor]:
    """Keep-masks pruning exactly ``round(sparsity * numel)`` lowest scores per tensor (``layer``)
    or across all tensors (``global``); positions ``allowed`` marks False are pruned first and
    never kept. Ties: lower flat index pruned first."""
    if scope not in ("layer", "global"):
        raise ConfigError(f"scope must be 'layer' or 'global', got {scope!r}")
    pri = list(allowed) if allowed is not None else [None] * len(scores)
    if len(pri) != len(scores):
        raise ValueError(f"got {len(scores)} score tensors but {len(pri)} allowed masks")
    ranked = [_ranked(s, a) for s, a in zip(scores, pri)]
    if scope == "layer":
        masks = [lowest_k_mask(r, num_pruned(r.numel(), sparsity)) for r in ranked]
    else:
        flat = torch.cat([r.reshape(-1).cpu() for r in ranked])
        keep = lowest_k_mask(flat, num_pruned(flat.numel(), sparsity))
        masks = [m.reshape(r.shape).to(r.device) for m, r in zip(keep.split(
            [r.numel() for r in ranked]), ranked)]  # fmt: skip
    return [m if a is None else m & a.to(m.device, torch.bool) for m, a in zip(masks, pri)]


class _Tracked:
    """One weight under movement pruning: its score, its values aside and its masks."""

    def __init__(self, ref: WeightRef) -> None:
        values, prior = current(ref)  # refuses a quantized weight
        self.ref = ref
        self.allowed = None if prior is None else prior.clone()
        self.scores = torch.zeros(values.shape, dtype=torch.float32, device=values.device)
        self.aside = values.clone()  # unmasked values (those of pruned positions are frozen)

    def mask(self) -> torch.Tensor | None:
        state = get_state(self.ref.module, self.ref.param)
        return state.mask if state is not None else None

    def full(self) -> torch.Tensor:
        """The unmasked weight: live values where kept, the values set aside where pruned."""
        w, mask = self.ref.weight.detach(), self.mask()
        return w if mask is None else torch.where(mask.to(w.device), w, self.aside)

    def update(self) -> None:
        grad = self.ref.weight.grad
        if grad is not None:
            accumulate_movement(self.scores, self.full(), grad)

    def set_mask(self, mask: torch.Tensor) -> None:
        full = self.full()
        self.aside = full.clone()
        with torch.no_grad():
            self.ref.weight.copy_(full)  # revived positions get their old value back
        state = get_state(self.ref.module, self.ref.param)
        new = WeightState(mask=mask) if state is None else replace(state, mask=mask)
        apply_state(self.ref.module, self.ref.param, new)


class MovementPruning(ScheduledPruning):
    """Hard movement pruning on ``schedule`` during training (see the module docstring).

    ``history`` records ``(step, scheduled, achieved)`` per pruning event.
    """

    def __init__(
        self,
        schedule: CubicSchedule,
        targets: Sequence[str] | None = None,
        ignore: Sequence[str] = (),
        scope: Scope = "layer",
    ) -> None:
        super().__init__(schedule, targets, ignore, scope)
        self.tracked: list[_Tracked] = []

    @property
    def refs(self) -> list[WeightRef]:
        return [t.ref for t in self.tracked]

    def on_train_begin(self, model: nn.Module) -> None:
        refs = select_weights(model, self.targets, self.ignore)
        self.tracked = [_Tracked(ref) for ref in refs]

    def on_after_backward(self, model: nn.Module, step: int) -> None:
        if not self.tracked:
            self.on_train_begin(model)
        for t in self.tracked:  # runs before KeepMasks zeroes the pruned gradients
            t.update()

    def on_step_end(self, model: nn.Module, step: int) -> None:
        if not self.schedule.is_pruning_step(step):
            return
        target = self.schedule.sparsity_at(step)
        if target > 0:
            masks = movement_masks(
                [t.scores for t in self.tracked], target, self.scope,
                [t.allowed for t in self.tracked],
            )  # fmt: skip
            for t, mask in zip(self.tracked, masks):
                t.set_mask(mask)
        achieved = sparsity_of(self.refs)
        self.history.append((step, target, achieved))
        log.debug("movement pruning step %d: target %.4f, achieved %.4f", step, target, achieved)

    def on_train_end(self, model: nn.Module) -> None:
        log.info(
            "movement pruning: %d events, final sparsity %.4f (target %.4f)",
            len(self.history), sparsity_of(self.refs), self.schedule.final,
        )  # fmt: skip
