import json
from pathlib import Path

import numpy as np
import pytest

from slimtorch import api as st
from slimtorch.search.space import choice, to_recipe, uniform
from slimtorch.search.trials import LocalProcessRunner, SerialRunner, TrialStore, run_trial

LENET = ["conv1", "conv2", "fc1", "fc2"]


def tiny_npz(path: Path, n: int = 48) -> str:
    rng = np.random.default_rng(0)
    arrays = {}
    for split in ("train", "test"):
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = rng.integers(0, 10, n).astype(np.int64)
    np.savez(path, **arrays)
    return str(path)


def spec(tmp_path: Path, recipe: dict, **kw: object) -> dict:
    data = tiny_npz(tmp_path / "tiny.npz")
    return {
        "id": "t1",
        "model": "builtin:lenet5-fashion",
        "data": None,
        "eval_data": data,
        "recipe": recipe,
        "out": str(tmp_path / "trials" / "t1"),
        "latency_batch": 1,
        "runtime": "torch",
        "threads": 1,
        "seed": 0,
        "input": None,
        **kw,
    }


def test_run_trial_saves_and_measures_the_artifact(tmp_path: Path) -> None:
    recipe = to_recipe(uniform(LENET, choice(0.5, "int", 8)))
    result = run_trial(spec(tmp_path, recipe))
    assert result["status"] == "ok", result["error"]
    out = tmp_path / "trials" / "t1"
    assert result["bytes"] == st.artifact_size(out)
    assert 0.0 <= result["quality"] <= 100.0 and result["metric"] == "accuracy"
    assert result["latency_ms"] > 0
    json.dumps(result)  # JSON-able, for any scheduler
    model = st.load(out)
    assert float((model.fc1.weight == 0).float().mean()) == pytest.approx(0.5, abs=1e-3)


def test_run_trial_never_raises(tmp_path: Path) -> None:
    bad = {"stages": [{"method": "prune.magnitude", "sparsity": 0.5, "targets": ["nope"]}]}
    result = run_trial(spec(tmp_path, bad))
    assert result["status"] == "failed" and "nope" in result["error"]
    assert not (tmp_path / "trials" / "t1").exists()


def test_serial_runner_turns_a_raising_function_into_a_failed_result() -> None:
    def boom(s: dict) -> dict:
        raise RuntimeError("out of memory")

    (result,) = SerialRunner(boom).run([{"id": "x"}])
    assert result["status"] == "failed" and result["error"] == "RuntimeError: out of memory"


@pytest.mark.slow
def test_process_runner_runs_specs_in_spawned_workers(tmp_path: Path) -> None:
    specs = [
        {"id": f"s{i}", "model": "builtin:no-such-model", "out": str(tmp_path / str(i))}
        for i in range(2)
    ]
    runner = LocalProcessRunner(workers=2)
    try:
        results = sorted(runner.run(specs), key=lambda r: r["id"])
    finally:
        runner.close()
    assert [r["id"] for r in results] == ["s0", "s1"]
    assert all(r["status"] == "failed" and "no-such-model" in r["error"] for r in results)


def test_store_appends_and_survives_a_torn_line(tmp_path: Path) -> None:
    store = TrialStore(tmp_path / "trials.jsonl")
    store.append({"id": "a", "status": "ok"})
    with open(store.path, "a") as f:
        f.write('{"id": "b", "sta')  # a kill in the middle of a write
    store.append({"id": "c", "status": "failed", "error": "x"})
    store.append({"id": "a", "status": "failed"})  # a duplicate never replaces the first
    loaded = store.load()
    assert sorted(loaded) == ["a", "c"] and loaded["a"]["status"] == "ok"
