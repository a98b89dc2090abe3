"""Pick the width a ``prune.reorder``-ed model runs at, from a latency or size budget measured
on this machine (the seed's dynamic pruning: one artifact, the width chosen when it runs)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from slimtorch.artifact.widths import narrow
from slimtorch.core.errors import UserInputError
from slimtorch.eval.latency import measure_latency_ms

DEFAULT_WIDTHS = (1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25)


@dataclass
class WidthChoice:
    """The widest width within budget, its model, and every width measured."""

    width: float
    model: nn.Module
    measured: list[dict[str, float]] = field(default_factory=list)


def choose_width(
    model: nn.Module,
    inputs: Sequence[Any],
    max_latency_ms: float | None = None,
    max_params: int | None = None,
    widths: Sequence[float] = DEFAULT_WIDTHS,
    repeats: int = 10,
) -> WidthChoice:
    """The widest of ``widths`` whose latency on ``inputs`` and parameter count fit the budget.

    Widths are tried from the widest down; latency is measured here, now (so the choice follows
    the machine's current load). Raises when even the narrowest width does not fit.
    """
    if max_latency_ms is None and max_params is None:
        raise UserInputError("give a budget: max_latency_ms and/or max_params")
    measured: list[dict[str, float]] = []
    for width in sorted(widths, reverse=True):
        candidate = narrow(model, width) if width < 1 else model
        params = sum(p.numel() for p in candidate.parameters())
        row: dict[str, float] = {"width": width, "params": float(params)}
        if max_params is not None and params > max_params:
            measured.append(row)
            continue
        if max_latency_ms is not None:
            row["latency_ms"] = measure_latency_ms(candidate, inputs, repeats=repeats)
            if row["latency_ms"] > max_latency_ms:
                measured.append(row)
                continue
        measured.append(row)
        return WidthChoice(width, candidate.eval(), measured)
    raise UserInputError(
        f"no width in {list(widths)} meets the budget (max_latency_ms={max_latency_ms},"
        f" max_params={max_params}); measured: {measured}. Relax the budget or add narrower"
        " widths"
    )
