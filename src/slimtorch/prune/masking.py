"""Module plumbing shared by the pruning methods: read a weight, attach a mask, measure sparsity.

A pruned weight carries ``WeightState(mask=...)`` (True = kept) and holds the masked values.
Pruning an already-pruned weight combines masks (new AND old); pruning a quantized weight is
refused, because the integer grid would no longer describe the values.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Literal

import torch
from torch import nn

from slimtorch.core.errors import ConfigError
from slimtorch.formats.state import WeightState, apply_state, get_state, iter_states
from slimtorch.graph.weights import WeightRef
from slimtorch.prune.criteria import global_magnitude_masks, magnitude_mask

log = logging.getLogger(__name__)

Scope = Literal["layer", "global"]
MaskFn = Callable[[torch.Tensor, torch.Tensor | None, WeightRef], torch.Tensor]


def _state(ref: WeightRef) -> WeightState | None:
    """The weight's state; refuses a quantized weight (pruning would break its integer grid)."""
    state = get_state(ref.module, ref.param)
    if state is not None and state.quant is not None:
        raise ConfigError(
            f"prune before quantizing: weight {ref.name!r} is already quantized, and pruning it"
            " would break its integer grid; move the prune stage earlier in the recipe"
        )
    return state


def current(ref: WeightRef) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(values, prior_mask)`` of a weight about to be pruned; refuses quantized weights."""
    state = _state(ref)
    return ref.weight.detach(), state.mask if state is not None else None


def set_mask(ref: WeightRef, mask: torch.Tensor) -> None:
    """Attach ``mask`` (AND any existing mask) to the weight and zero the pruned values."""
    w = ref.weight
    if mask.shape != w.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} != weight shape {tuple(w.shape)}")
    mask = mask.to(device=w.device, dtype=torch.bool)
    state = _state(ref)
    if state is None:
        state = WeightState(mask=mask)
    else:
        combined = mask if state.mask is None else mask & state.mask.to(mask.device)
        state = replace(state, mask=combined, extra=dict(state.extra))
    apply_state(ref.module, ref.param, state)


def prune_each(refs: Sequence[WeightRef], fn: MaskFn) -> None:
    """Prune every weight with ``fn(values, prior_mask, ref) -> keep_mask``."""
    checked = [(ref, *current(ref)) for ref in refs]  # fail before touching any weight
    for ref, w, prior in checked:
        set_mask(ref, fn(w, prior, ref))


def magnitude_prune(refs: Sequence[WeightRef], sparsity: float, scope: Scope = "layer") -> None:
    """Magnitude pruning of ``refs`` to ``sparsity``, per layer or with one global threshold."""
    if scope == "layer":
        prune_each(refs, lambda w, prior, _ref: magnitude_mask(w, sparsity, prior))
        return
    checked = [(ref, *current(ref)) for ref in refs]
    masks = global_magnitude_masks([w for _, w, _ in checked], sparsity, [p for _, _, p in checked])
    for (ref, _, _), mask in zip(checked, masks):
        set_mask(ref, mask)


def mask_of(ref: WeightRef) -> torch.Tensor | None:
    state = get_state(ref.module, ref.param)
    return state.mask if state is not None else None


def sparsity_of(refs: Sequence[WeightRef]) -> float:
    """Fraction of the weights of ``refs`` that their masks prune (0 for unmasked weights)."""
    total = sum(ref.numel() for ref in refs)
    pruned = 0
    for ref in refs:
        mask = mask_of(ref)
        if mask is not None:
            pruned += int((~mask).sum())
    return pruned / total if total else 0.0


def log_sparsity(stage: str, refs: Sequence[WeightRef]) -> float:
    """Log the achieved sparsity of a stage overall (info) and per layer (debug); return it."""
    achieved = sparsity_of(refs)
    log.info(
        "%s: sparsity %.4f over %d weights in %d tensors",
        stage,
        achieved,
        sum(r.numel() for r in refs),
        len(refs),
    )
    for ref in refs:
        log.debug("%s: %s sparsity %.4f", stage, ref.name, sparsity_of([ref]))
    return achieved


def reapply_masks(model: nn.Module) -> int:
    """Zero every masked weight of ``model`` again; returns how many tensors it touched.

    For your own training loop: call it right after ``optimizer.step()`` so pruned weights stay
    exactly zero (slimtorch's trainer does this itself through ``calibrate.train.KeepMasks``).
    """
    touched = 0
    with torch.no_grad():
        for _, module, param, state in iter_states(model):
            if state.mask is not None:
                p = getattr(module, param)
                p.mul_(state.mask.to(device=p.device, dtype=p.dtype))
                touched += 1
    return touched
