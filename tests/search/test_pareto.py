from slimtorch.search.allocate import allocate, swaps, total
from slimtorch.search.pareto import best_within, dominates, pareto_front, pareto_indices


def test_dominates_needs_one_strict_improvement() -> None:
    a = {"bytes": 1, "latency_ms": 1.0, "drop": 0.1}
    assert dominates(a, {"bytes": 2, "latency_ms": 1.0, "drop": 0.1})
    assert not dominates(a, dict(a))
    assert not dominates(a, {"bytes": 0, "latency_ms": 5.0, "drop": 5.0})
    assert dominates(a, {"bytes": 1, "latency_ms": None, "drop": 0.1})  # None is worst


def test_pareto_indices_known_front() -> None:
    pts = [
        {"bytes": 10, "latency_ms": 1, "drop": 0.0},
        {"bytes": 5, "latency_ms": 1, "drop": 1.0},
        {"bytes": 6, "latency_ms": 1, "drop": 1.5},  # dominated by index 1
        {"bytes": 2, "latency_ms": 1, "drop": 3.0},
        {"bytes": 10, "latency_ms": 2, "drop": 0.0},  # dominated by index 0
    ]
    assert pareto_indices(pts) == [3, 1, 0]
    assert pareto_indices(pts, keys=("bytes",)) == [3]


def test_pareto_front_ignores_failed_and_best_within() -> None:
    trials = [
        {"id": "a", "status": "ok", "bytes": 5, "latency_ms": 1, "drop": 0.5, "meets_budget": True},
        {"id": "b", "status": "ok", "bytes": 3, "latency_ms": 1, "drop": 0.5, "meets_budget": True},
        {"id": "c", "status": "failed", "bytes": None, "latency_ms": None, "drop": None},
        {
            "id": "d",
            "status": "ok",
            "bytes": 9,
            "latency_ms": 1,
            "drop": 0.1,
            "meets_budget": False,
        },
    ]
    assert pareto_front(trials) == ["b", "d"]
    best = best_within(trials)
    assert best is not None and best["id"] == "b"  # same drop as a, fewer bytes
    assert best_within([trials[2]]) is None


COSTS = {
    "a": {"dense": (100, 0.0), "int8": (25, 0.1), "int4": (13, 2.0)},
    "b": {"dense": (100, 0.0), "int8": (25, 1.0), "int4": (13, 1.2)},
}


def test_allocate_finds_the_knapsack_optimum() -> None:
    assert allocate(COSTS, 200) == {"a": "dense", "b": "dense"}
    # 125 bytes: one layer dense; b is the costly one to quantize, so b stays dense
    assert allocate(COSTS, 125) == {"a": "int8", "b": "dense"}
    # 38 bytes: int8 + int4; a at int8 and b at int4 (0.1 + 1.2) beats the reverse (2.0 + 1.0)
    assert allocate(COSTS, 38) == {"a": "int8", "b": "int4"}
    assert allocate(COSTS, 20) is None


def test_swaps_stay_in_budget_and_rank_by_drop() -> None:
    moves = swaps(COSTS, {"a": "int4", "b": "int4"}, 50, 3)
    assert moves and all(total(COSTS, m)[0] <= 50 for m in moves)
    # one layer relaxed at a time: a to int8 (drop 1.3) beats b to int8 (drop 3.0)
    assert moves[0] == {"a": "int8", "b": "int4"}
    assert {"a": "int4", "b": "int8"} in moves
