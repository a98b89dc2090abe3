"""Quality evaluators: a registry from evaluator name to a function returning a Quality."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from slimtorch.core.context import Context
from slimtorch.core.registry import Registry


@dataclass
class Quality:
    """One headline metric (``metric`` names it) plus any secondary figures in ``extra``.

    ``higher_is_better`` tells reports which direction is a loss of quality.
    """

    metric: str
    value: float
    higher_is_better: bool = True
    extra: dict[str, float] = field(default_factory=dict)


# fn(model, ctx, data) -> Quality; ``data`` is a dataset spec (``builtin:NAME`` or a path) or None
Evaluator = Callable[[nn.Module, Context, Any], Quality]

EVALUATORS: Registry[Evaluator] = Registry("evaluator")


def get_evaluator(name: str) -> Evaluator:
    for mod in (
        "slimtorch.eval.accuracy",
        "slimtorch.eval.similarity",
        "slimtorch.eval.language",
        "slimtorch.eval.perplexity",
    ):
        importlib.import_module(mod)
    return EVALUATORS.get(name)
