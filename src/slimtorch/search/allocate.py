"""Per-layer allocation under a size budget: pure functions over a cost table.

``costs[layer][choice] = (bytes, drop)``: the bytes a layer's weight takes with that choice and
the quality drop predicted for it (from a sensitivity scan, or a data-free proxy). The drops of
layers are taken to add up. :func:`allocate` solves

    minimise  sum drop(layer, choice)   subject to   sum bytes(layer, choice) <= budget

by the Lagrangian relaxation (per layer, argmin of drop + lam * bytes; bisection on lam), then
spends any budget left by greedy upgrades. :func:`swaps` proposes the moves of the measured
refinement.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

Costs = Mapping[str, Mapping[str, tuple[int, float]]]
Assignment = dict[str, str]


def total(costs: Costs, assign: Mapping[str, str]) -> tuple[int, float]:
    """``(bytes, drop)`` of an assignment."""
    b = sum(costs[layer][key][0] for layer, key in assign.items())
    d = sum(costs[layer][key][1] for layer, key in assign.items())
    return b, d


def _argmin(costs: Costs, lam: float) -> Assignment:
    return {
        layer: min(options, key=lambda k: (options[k][1] + lam * options[k][0], options[k][0], k))
        for layer, options in costs.items()
    }


def _upgrade(costs: Costs, assign: Assignment, budget: int) -> Assignment:
    """Greedy: repeatedly take the move that lowers the drop most per extra byte and fits."""
    assign = dict(assign)
    used = total(costs, assign)[0]
    while True:
        best, best_rate = None, 0.0
        for layer, options in costs.items():
            b0, d0 = options[assign[layer]]
            for key, (b, d) in options.items():
                if d < d0 and used - b0 + b <= budget:
                    rate = (d0 - d) / max(b - b0, 1)
                    if rate > best_rate:
                        best, best_rate = (layer, key), rate
        if best is None:
            return assign
        layer, key = best
        used += costs[layer][key][0] - costs[layer][assign[layer]][0]
        assign[layer] = key


def allocate(costs: Costs, budget: int, iterations: int = 60) -> Assignment | None:
    """The assignment of least predicted drop whose bytes fit ``budget`` (None: none fits)."""
    smallest = {layer: min(o, key=lambda k: (o[k][0], o[k][1], k)) for layer, o in costs.items()}
    if total(costs, smallest)[0] > budget:
        return None
    lo, hi = 0.0, 1.0
    while total(costs, _argmin(costs, hi))[0] > budget and hi < 1e30:
        hi *= 10.0
    if hi >= 1e30:
        return _upgrade(costs, smallest, budget)
    for _ in range(iterations):  # smallest lam whose relaxed solution fits
        mid = math.sqrt(lo * hi) if lo > 0 else hi / 1e6
        if total(costs, _argmin(costs, mid))[0] <= budget:
            hi = mid
        else:
            lo = mid
    return _upgrade(costs, _argmin(costs, hi), budget)


def swaps(costs: Costs, assign: Mapping[str, str], budget: int, n: int) -> list[Assignment]:
    """Up to ``n`` neighbours of ``assign`` that fit ``budget``: one layer relaxed or tightened
    (single moves) or one relaxed and another tightened (swaps), ranked by predicted drop then
    bytes; moves that change nothing are left out."""
    base = dict(assign)
    used, _ = total(costs, base)
    found: dict[tuple[tuple[str, str], ...], tuple[float, int, Assignment]] = {}

    def consider(cand: Assignment) -> None:
        b, d = total(costs, cand)
        if b <= budget and cand != base:
            found.setdefault(tuple(sorted(cand.items())), (d, -b, cand))

    layers = list(costs)
    for layer in layers:
        for key in costs[layer]:
            if key == base[layer]:
                continue
            cand = {**base, layer: key}
            consider(cand)
            extra = costs[layer][key][0] - costs[layer][base[layer]][0]
            if used + extra <= budget:
                continue
            for other in layers:  # pay for the extra bytes elsewhere, most cheaply in drop
                if other == layer:
                    continue
                fits = [
                    k
                    for k, (b, _d) in costs[other].items()
                    if used + extra - costs[other][base[other]][0] + b <= budget
                ]
                if fits:
                    pick = min(fits, key=lambda k: (costs[other][k][1], -costs[other][k][0], k))
                    consider({**cand, other: pick})
    ranked = sorted(found.values(), key=lambda t: (t[0], t[1], sorted(t[2].items())))
    return [cand for _, _, cand in ranked[:n]]
