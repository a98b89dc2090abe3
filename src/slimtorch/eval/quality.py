"""Quality evaluators: one registry from evaluator name to an :class:`Evaluator`.

Every evaluator is called the same way::

    quality = evaluator(model, ctx, data, samples=None, split="evaluation")

* ``data``: a dataset spec (``builtin:NAME``, a path) or None for the evaluator's default;
* ``samples``: None runs the evaluator's standard protocol (its evaluation set, the numbers
  ``slimtorch eval`` reports); N measures a fixed, evenly spaced subsample of N items (see
  :func:`spaced`: the same items every time, so two models' numbers are paired), counted in
  the evaluator's own unit (images, documents, characters, tokens);
* ``split``: ``"evaluation"`` (the test / held-out split) or ``"calibration"`` (the training
  split where the data has one), so that choices tuned on it are not tuned on the test set.

An :class:`Evaluator` knows its metric's name and direction before it runs, and the default
subsample of a sensitivity scan. ``evaluator.bind(...)`` loads and subsamples the data once and
returns a :data:`Measure` (model -> Quality) to call on any number of models; calling the
evaluator is ``bind`` then one measure. The bundled evaluators (``accuracy``, ``lee``, ``bpc``,
``perplexity``) come from the ``slimtorch.zoo`` plugin; a package adds its own with
``EVALUATORS.add(name, Evaluator(...))`` in a ``slimtorch.plugins`` entry point. A plain
function ``fn(model, ctx, data) -> Quality`` is accepted too: it always runs whole.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch
from torch import nn

from slimtorch.core.context import Context
from slimtorch.core.errors import UserInputError
from slimtorch.core.registry import Registry

Split = Literal["calibration", "evaluation"]
SPLITS: tuple[Split, ...] = ("calibration", "evaluation")


@dataclass
class Quality:
    """One headline metric (``metric`` names it) plus any secondary figures in ``extra``.

    ``higher_is_better`` tells reports which direction is a loss of quality.
    """

    metric: str
    value: float
    higher_is_better: bool = True
    extra: dict[str, float] = field(default_factory=dict)


# A prepared measurement: the data is loaded and subsampled; call it on any model.
Measure = Callable[[nn.Module], Quality]


class Prepare(Protocol):
    """Load ``split`` of ``data`` (``samples`` items of it, None: the standard protocol) for
    ``model`` (whose tokenizer or context may matter) and return the :data:`Measure`."""

    def __call__(
        self, model: nn.Module, ctx: Context, data: Any, samples: int | None, split: Split
    ) -> Measure: ...


def check_request(samples: int | None, split: str) -> None:
    """Refuse a ``split`` other than calibration / evaluation and ``samples`` below 1."""
    if split not in SPLITS:
        raise UserInputError(f"split must be 'calibration' or 'evaluation', got {split!r}")
    if samples is not None and samples < 1:
        raise UserInputError(f"samples must be at least 1, got {samples}")


@dataclass(frozen=True)
class Evaluator:
    """A registered evaluator: what it measures, and how to prepare a measurement.

    ``scan_samples`` is the subsample a sensitivity scan uses by default (None: the whole
    standard protocol).
    """

    metric: str
    higher_is_better: bool
    prepare: Prepare
    scan_samples: int | None = None

    def bind(
        self,
        model: nn.Module,
        ctx: Context,
        data: Any = None,
        *,
        samples: int | None = None,
        split: Split = "evaluation",
    ) -> Measure:
        """Load the data once; the returned function measures any model on it."""
        check_request(samples, split)
        return self.prepare(model, ctx, data, samples, split)

    def __call__(
        self,
        model: nn.Module,
        ctx: Context,
        data: Any = None,
        *,
        samples: int | None = None,
        split: Split = "evaluation",
    ) -> Quality:
        return self.bind(model, ctx, data, samples=samples, split=split)(model)


# fn(model, ctx, data) -> Quality: an evaluator that always runs whole
PlainEvaluator = Callable[[nn.Module, Context, Any], Quality]

EVALUATORS: Registry[Evaluator | PlainEvaluator] = Registry("evaluator", plugins=True)


def get_evaluator(name: str) -> Evaluator | PlainEvaluator:
    """The evaluator ``name``; an unknown name lists the known ones and the nearest."""
    return EVALUATORS.get(name)


def spaced(n_total: int, n: int) -> torch.Tensor:
    """``min(n, n_total)`` evenly spaced indices into ``range(n_total)`` (int64, ascending)."""
    if n_total < 1:
        raise UserInputError("nothing to evaluate on: the dataset is empty")
    if n < 1:
        raise UserInputError(f"samples must be at least 1, got {n}")
    if n >= n_total:
        return torch.arange(n_total, dtype=torch.int64)
    return torch.linspace(0, n_total - 1, n).round().to(torch.int64)
