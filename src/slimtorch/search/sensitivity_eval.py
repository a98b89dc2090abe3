"""Fast quality functions for sensitivity scans: the model's own evaluator on a fixed subsample.

A scan evaluates the model hundreds of times, so it binds the model's evaluator (from
:data:`slimtorch.eval.quality.EVALUATORS`) once to a fixed, evenly spaced subsample (the same
items every time, so differences between trials are paired) of the *calibration* split by
default (the training split where the data has one), so choices tuned on it are not tuned on
the test set. ``samples`` counts items in the evaluator's unit; None takes the evaluator's
``scan_samples`` (accuracy: 1,000 images; lee: all 50 documents; bpc: 5,000 characters;
perplexity: 2,048 tokens). An evaluator registered as a plain function runs whole.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

from torch import nn

from slimtorch.core.context import Context
from slimtorch.core.errors import UserInputError
from slimtorch.eval.quality import Evaluator, PlainEvaluator, Split, check_request, get_evaluator
from slimtorch.models.registry import LoadedModel

Evaluate = Callable[[nn.Module], float]


def _whole(
    fn: PlainEvaluator, model: nn.Module, data: Any, ctx: Context
) -> tuple[Evaluate, str, bool]:
    """A plain-function evaluator, on its full data (no subsampling)."""
    first = fn(model, ctx, data)  # tells the metric's name and direction

    def evaluate(m: nn.Module) -> float:
        return float(fn(m, ctx, data).value)

    return evaluate, first.metric, first.higher_is_better


def task_evaluator(
    loaded: LoadedModel,
    data: str | None = None,
    samples: int | None = None,
    *,
    split: Split = "calibration",
    ctx: Context | None = None,
) -> tuple[Evaluate, str, bool]:
    """``(evaluate, metric, higher_is_better)`` for a scan of ``loaded``: its own metric on a
    fixed subsample of ``samples`` items (``None``: the evaluator's ``scan_samples``).

    ``data`` overrides the model's dataset as in ``slimtorch compress --data`` (ignored for
    models whose training data differs from their evaluation data, such as MiniLM).
    """
    check_request(samples, split)
    ctx = ctx or Context(progress=False)
    name = loaded.evaluator
    if name is None:
        raise UserInputError(
            f"slimtorch knows no quality metric for {loaded.source}: call"
            " slimtorch.search.sensitivity.scan with your own evaluate(model) -> float"
        )
    spec = (data if loaded.evaluates_training_data else None) or loaded.data
    fn = get_evaluator(name)
    if isinstance(fn, Evaluator):
        n = fn.scan_samples if samples is None else samples
        measure = fn.bind(loaded.model, ctx, spec, samples=n, split=split)
        return (lambda m: float(measure(m).value)), fn.metric, fn.higher_is_better
    if samples is not None:
        warnings.warn(f"evaluator {name!r} cannot be subsampled; using all its data", stacklevel=2)
    return _whole(fn, loaded.model, spec, ctx)
