"""Per-layer sensitivity: how much quality a model loses when one layer alone is compressed.

For every compressible layer and every value of every kind of choice, :func:`scan` applies that
one choice to that one layer (through the same recipe stages a real run uses, see
:func:`single_choice_stages`), evaluates the model, and puts the layer's weights and compression
state back exactly as they were. The result is a :class:`Sensitivity` table (JSON + Markdown).

The choice vocabulary, shared with the budget-driven auto-search:

* ``prune``: unstructured magnitude sparsity in (0, 1), ``prune.magnitude`` with ``scope: layer``;
* ``bits``: integer weight bits 2..8, ``quantize.rtn`` symmetric and per output channel; at 4
  bits and below per groups of :data:`GROUP_SIZE` input columns (a layer with at most that many
  inputs has one group per row, i.e. it is per channel);
* ``codebook``: index bits 2..8 of a k-means codebook of ``2**bits`` shared values,
  ``share.kmeans``.

Layers are modules of the types in :data:`SCAN_TYPES`; a MultiheadAttention layer covers its
``out_proj`` too (a stage targeting it compresses both). Embeddings are scanned only when named
in ``layers``.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from slimtorch.core.context import Context
from slimtorch.core.errors import ConfigError, TargetError, UserInputError
from slimtorch.core.methods import Run
from slimtorch.core.registry import nearest
from slimtorch.formats.state import clear_state, get_state, set_state
from slimtorch.graph.weights import SUPPORTED_TYPES, WeightRef, select_weights
from slimtorch.recipe import parse_recipe
from slimtorch.search.sensitivity_eval import task_evaluator
from slimtorch.search.sensitivity_table import (
    KINDS,
    LayerSensitivity,
    Point,
    Sensitivity,
    quality_drop,
    to_markdown,
)

__all__ = [
    "KINDS",
    "LayerSensitivity",
    "Point",
    "Sensitivity",
    "check_choice",
    "scan",
    "scan_layers",
    "single_choice_stages",
    "task_evaluator",
    "to_markdown",
]

log = logging.getLogger(__name__)

DEFAULT_PRUNE = (0.3, 0.5, 0.7, 0.9)
DEFAULT_BITS = (8, 6, 4, 3, 2)
DEFAULT_CODEBOOK = (8, 6, 4, 3, 2)
GROUP_SIZE = 128  # input columns per quantization group at GROUP_BITS bits and below
GROUP_BITS = 4
SCAN_TYPES = ("Linear", "Conv1d", "Conv2d", "MultiheadAttention", "LSTM", "GRU")

Evaluate = Callable[[nn.Module], float]


def check_choice(kind: str, value: float) -> float:
    """``value`` validated for ``kind`` (an int-valued float for ``bits``/``codebook``)."""
    if kind not in KINDS:
        hint = nearest(str(kind), list(KINDS))
        raise ConfigError(
            f"unknown choice kind {kind!r}"
            + (f"; did you mean {hint!r}?" if hint else "")
            + f" Use one of {', '.join(KINDS)}"
        )
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{kind} value {value!r} is not a number") from None
    if kind == "prune":
        if not 0.0 < v < 1.0:
            raise ConfigError(f"prune value {value} must be a sparsity in (0, 1), e.g. 0.5")
        return v
    if v != int(v) or not 2 <= v <= 8:
        raise ConfigError(f"{kind} value {value} must be a whole number of bits in 2..8, e.g. 4")
    return float(int(v))


def single_choice_stages(layer: str, kind: str, value: float) -> list[dict[str, Any]]:
    """The recipe stages that apply the one choice ``kind=value`` to the module ``layer``."""
    v = check_choice(kind, value)
    targets = [layer]
    if kind == "prune":
        return [{"method": "prune.magnitude", "sparsity": v, "scope": "layer", "targets": targets}]
    bits = int(v)
    if kind == "codebook":
        return [{"method": "share.kmeans", "bits": bits, "targets": targets}]
    stage: dict[str, Any] = {
        "method": "quantize.rtn",
        "bits": bits,
        "symmetric": True,
        "granularity": "per_channel",
        "targets": targets,
    }
    if bits <= GROUP_BITS:
        stage.update({"granularity": "per_group", "group_size": GROUP_SIZE})
    return [stage]


def _is_mha_out_proj(name: str, modules: dict[str, nn.Module]) -> bool:
    parent, _, child = name.rpartition(".")
    return child == "out_proj" and type(modules.get(parent)).__name__ == "MultiheadAttention"


def scan_layers(model: nn.Module, layers: Sequence[str] | None = None) -> list[str]:
    """The layer names a scan visits: ``layers`` checked against the model, or every layer of
    :data:`SCAN_TYPES` (MultiheadAttention ``out_proj`` folded into its attention)."""
    modules = dict(model.named_modules())
    if layers is None:
        refs = select_weights(model, types=SCAN_TYPES)
        names = list(dict.fromkeys(r.module_name for r in refs))
        return [n for n in names if not _is_mha_out_proj(n, modules)]
    compressible = {r.module_name for r in select_weights(model)}
    for name in layers:
        if name not in compressible:
            hint = nearest(name, sorted(compressible))
            what = "has no compressible weight" if name in modules else "is not a module name"
            raise TargetError(
                f"layer {name!r} {what} in this model"
                + (f"; did you mean {hint!r}?" if hint else "")
                + f" Give exact module names of {', '.join(SUPPORTED_TYPES)} layers (e.g."
                f" {', '.join(sorted(compressible)[:5])})"
            )
    return list(dict.fromkeys(layers))


@contextmanager
def restored(refs: Sequence[WeightRef]) -> Iterator[None]:
    """Put the weights of ``refs`` and their compression states back exactly on exit."""
    saved = [(ref, ref.weight.detach().clone(), get_state(ref.module, ref.param)) for ref in refs]
    try:
        yield
    finally:
        with torch.no_grad():
            for ref, values, state in saved:
                ref.weight.copy_(values)
                if state is None:
                    clear_state(ref.module, ref.param)
                else:
                    set_state(ref.module, ref.param, state)


def apply_choice(model: nn.Module, layer: str, kind: str, value: float, ctx: Context) -> None:
    """Apply ``kind=value`` to ``layer`` in place, through the recipe stages."""
    recipe = parse_recipe({"stages": single_choice_stages(layer, kind, value)})
    run = Run(ctx)
    for stage in recipe.stages:
        stage.spec.apply(model, stage.config, run)


def _grid(
    prune: Sequence[float], bits: Sequence[float], codebook: Sequence[float]
) -> list[tuple[str, float]]:
    grid = [("prune", check_choice("prune", v)) for v in prune]
    grid += [("bits", check_choice("bits", v)) for v in bits]
    grid += [("codebook", check_choice("codebook", v)) for v in codebook]
    if not grid:
        raise ConfigError("nothing to scan: give at least one prune, bits or codebook value")
    return grid


def _entry(name: str, refs: Sequence[WeightRef]) -> LayerSensitivity:
    weights = [r.weight for r in refs]
    kind = refs[0].kind if refs else "?"
    params = sum(w.numel() for w in weights)
    dense = sum(w.numel() * w.element_size() for w in weights)
    return LayerSensitivity(name, kind, params, dense)


def scan(
    model: nn.Module,
    evaluate: Evaluate,
    *,
    higher_is_better: bool,
    layers: list[str] | None = None,
    prune: Sequence[float] = DEFAULT_PRUNE,
    bits: Sequence[float] = DEFAULT_BITS,
    codebook: Sequence[float] = DEFAULT_CODEBOOK,
    progress: bool = True,
    metric: str = "quality",
    model_name: str | None = None,
) -> Sensitivity:
    """Quality of ``model`` with each single choice applied to each layer alone.

    ``evaluate(model) -> float`` is called once for the baseline and once per (layer, choice);
    the model is modified in place during a trial and restored exactly after it (weights and
    compression states), so it comes back bit-identical. A choice a layer cannot take (e.g.
    pruning a layer that is already quantized) is skipped with a warning.
    """
    grid = _grid(prune, bits, codebook)
    names = scan_layers(model, layers)
    ctx = Context(progress=progress)
    quiet = Context(progress=False)
    baseline = float(evaluate(model))
    n_layers, n_choices = len(names), len(grid)
    log.info(
        "sensitivity: baseline %s %.6g; %d layers x %d choices",
        metric,
        baseline,
        n_layers,
        n_choices,
    )
    by_layer = {name: select_weights(model, [name]) for name in names}
    entries = [_entry(name, by_layer[name]) for name in names]
    table = {e.name: e for e in entries}
    trials = [(name, kind, value) for name in names for kind, value in grid]
    for name, kind, value in ctx.progress_bar(trials, "sensitivity", len(trials)):
        with restored(by_layer[name]):
            try:
                apply_choice(model, name, kind, value, quiet)
            except UserInputError as exc:
                warnings.warn(f"sensitivity: {name} {kind}={value:g} skipped: {exc}", stacklevel=2)
                continue
            quality = float(evaluate(model))
        drop = quality_drop(baseline, quality, higher_is_better)
        log.debug("sensitivity: %s %s=%g -> %.6g (drop %+.4g)", name, kind, value, quality, drop)
        getattr(table[name], kind).append(Point(value, quality, drop))
    return Sensitivity(metric, higher_is_better, baseline, entries, model_name)
