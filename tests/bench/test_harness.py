"""bench/harness.py (the scripts' shared timing, records, files and tables) and the catalogue of
bench/run_all.py. Nothing here runs a benchmark."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import harness
import run_all


def test_markdown_table_alignment_and_padding() -> None:
    text = harness.markdown_table(["a", "b", "c"], [[1, "x", 2.5], ["y"]], "lrr")
    assert text.splitlines() == [
        "| a | b | c |",
        "|---|---:|---:|",
        "| 1 | x | 2.5 |",
        "| y |  |  |",
    ]
    assert harness.markdown_table(["a"], []).splitlines()[1] == "|---|"
    with pytest.raises(ValueError, match="one of 'l'/'r' per column"):
        harness.markdown_table(["a", "b"], [], "l")
    with pytest.raises(ValueError, match="row has 2 cells"):
        harness.markdown_table(["a"], [[1, 2]])


def test_interleaved_takes_turns_and_counts() -> None:
    order: list[str] = []
    calls = {"a": lambda: order.append("a"), "b": lambda: order.append("b")}
    times = harness.interleaved(calls, 3, warmup=2, round_warmup=1, repeat=2)
    # warm-up: each callable twice in a row; then per round: a (1 + 2 calls), b (1 + 2 calls)
    assert order == ["a", "a", "b", "b"] + (["a"] * 3 + ["b"] * 3) * 3
    for t in times.values():
        assert t.runs == 3 and t.fastest <= t.median
        assert t.summary(3) == {"median": round(t.median, 3), "min": round(t.fastest, 3)}
    with pytest.raises(ValueError, match="rounds and repeat"):
        harness.interleaved(calls, 0)


def test_interleaved_budget_and_slow_warmup() -> None:
    def slow() -> None:
        harness.time.sleep(0.002)

    count = {"slow": 0}

    def counted() -> None:
        count["slow"] += 1
        slow()

    times = harness.interleaved(
        {"slow": counted, "fast": lambda: None},
        10,
        warmup=5,
        slow_warmup_s=0.001,
        budget_s=0.001,
        min_runs=3,
    )
    # one warm-up call (it took over 1 ms), then 3 timed runs over the budget: it sits out
    assert count["slow"] == 1 + 3
    assert times["slow"].runs == 3 and times["fast"].runs == 10


def test_timed_and_stopwatch() -> None:
    calls = iter(range(5))
    last, timing = harness.timed(lambda: next(calls), 3)
    assert last == 2 and timing.runs == 3
    with harness.stopwatch() as sw:
        harness.time.sleep(0.001)
    frozen = sw.seconds
    assert frozen >= 0.001 and sw.seconds == frozen and sw.ms == frozen * 1000
    running = harness.stopwatch()
    first = running.seconds
    harness.time.sleep(0.001)
    assert running.seconds >= first + 0.001  # not stopped: it keeps counting


def test_result_files_and_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(harness.RESULTS_ENV, str(tmp_path / "out"))
    path = harness.result_path("x.json")
    assert path == tmp_path / "out" / "x.json"
    assert harness.read_result(path, {"none": 1}) == {"none": 1}
    harness.save_result(path, {"value": 1.5}, packages=["pytest"])
    text = path.read_text()
    assert text.endswith("}\n")
    data = json.loads(text)
    env = data["environment"]
    assert data["value"] == 1.5
    for key in ("date", "git_commit", "python", "torch", "slimtorch", "cpu", "cpus", "threads"):
        assert key in env, key
    assert env["packages"]["pytest"] != harness.NOT_INSTALLED
    assert os.listdir(path.parent) == ["x.json"]  # the temporary file was renamed, not left
    assert harness.versions(["no-such-distribution-here"]) == {
        "no-such-distribution-here": "not installed"
    }


def test_run_all_lists_every_benchmark_script() -> None:
    """A new bench script must be added to run_all's catalogue (or named as not a benchmark)."""
    scripts = {p.stem for p in harness.HERE.glob("*.py")} - run_all.NOT_BENCHMARKS
    assert scripts == {b.name for b in run_all.BENCHES}
    for bench in run_all.BENCHES:
        assert bench.script.is_file() and bench.runs, bench.name
        assert bench.quick or bench.note, f"{bench.name}: no quick run and no note saying why"
        assert bench.results and all(n.endswith(".json") for n in bench.results), bench.name


def test_run_all_select_and_missing() -> None:
    assert [b.name for b in run_all.select(["fuse", "tp_resnet"])] == ["bench_fuse", "tp_resnet"]
    with pytest.raises(SystemExit, match="no benchmark named nope"):
        run_all.select(["nope"])
    assert run_all.missing(("json", "/", "no_such_module_here", "/no/such/path")) == [
        "no_such_module_here",
        "/no/such/path",
    ]
