"""Pareto sets over measured trials: pure functions, every objective minimised.

A point ``a`` dominates ``b`` when it is no worse in every objective and better in at least one.
Missing objectives (``None``) compare as worst, so a trial that could not be timed never
dominates one that was.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

OBJECTIVES: tuple[str, ...] = ("bytes", "latency_ms", "drop")


def _value(point: Mapping[str, Any], key: str) -> float:
    v = point.get(key)
    return math.inf if v is None else float(v)


def dominates(a: Mapping[str, Any], b: Mapping[str, Any], keys: Sequence[str] = OBJECTIVES) -> bool:
    """True when ``a`` is no worse than ``b`` in every objective of ``keys`` and better in one."""
    better = False
    for key in keys:
        va, vb = _value(a, key), _value(b, key)
        if va > vb:
            return False
        if va < vb:
            better = True
    return better


def pareto_indices(
    points: Sequence[Mapping[str, Any]], keys: Sequence[str] = OBJECTIVES
) -> list[int]:
    """Indices of the non-dominated ``points``, sorted by the first objective then the rest.

    Exact duplicates are all kept (neither dominates the other). O(n^2), fine for the few
    hundred trials of a search.
    """
    front = [
        i
        for i, p in enumerate(points)
        if not any(dominates(q, p, keys) for j, q in enumerate(points) if j != i)
    ]
    return sorted(front, key=lambda i: tuple(_value(points[i], k) for k in keys))


def pareto_front(
    trials: Sequence[Mapping[str, Any]], keys: Sequence[str] = OBJECTIVES
) -> list[str]:
    """Ids of the non-dominated successful trials (``status == "ok"``), smallest first."""
    ok = [t for t in trials if t.get("status") == "ok"]
    return [str(ok[i]["id"]) for i in pareto_indices(ok, keys)]


def best_within(
    trials: Sequence[Mapping[str, Any]], key: str = "drop", tie: Sequence[str] = ("bytes",)
) -> Mapping[str, Any] | None:
    """The trial meeting its budget (``meets_budget``) with the least ``key``; ties by ``tie``."""
    fits = [t for t in trials if t.get("status") == "ok" and t.get("meets_budget")]
    if not fits:
        return None
    return min(fits, key=lambda t: (_value(t, key), *(_value(t, k) for k in tie), str(t["id"])))
