import json
from pathlib import Path
from typing import Any

import pytest
from test_trials import LENET, tiny_npz

from slimtorch import api
from slimtorch.core.errors import ConfigError
from slimtorch.recipe import load_recipe
from slimtorch.search.auto import AutoOptions, Budgets, auto_search, check_budgets
from slimtorch.search.outdir import report
from slimtorch.search.profiles import load_profile, parse_duration, parse_size
from slimtorch.search.space import check_config, choice, to_recipe, trial_id
from slimtorch.search.trials import SerialRunner, run_trial


def test_sizes_and_durations_parse() -> None:
    assert parse_size("2MB", 0) == 2_000_000
    assert parse_size("500KB", 0) == 500_000
    assert parse_size("512KiB", 0) == 524_288
    assert parse_size("20x", 1_000_000) == 50_000
    assert parse_size(1234, 0) == 1234
    for bad in ("2 parsecs", "0.5x", "0MB"):
        with pytest.raises(ConfigError, match=r"e\.g\."):
            parse_size(bad, 1000)
    assert parse_duration("10m") == 600 and parse_duration("90") == 90
    with pytest.raises(ConfigError, match="10m"):
        parse_duration("soon")


def test_bad_budgets_say_how_to_fix() -> None:
    with pytest.raises(ConfigError, match="--max-size"):
        check_budgets(Budgets())
    with pytest.raises(ConfigError, match=">= 0"):
        check_budgets(Budgets(max_drop=-1))
    with pytest.raises(ConfigError, match="positive"):
        check_budgets(Budgets(max_latency_ms=0))


def test_profiles_ship_and_a_user_file_extends_one(tmp_path: Path) -> None:
    name, phone = load_profile("phone")
    assert name == "phone" and phone.max_size == "25MB" and phone.threads == 2
    user = tmp_path / "tiny-phone.yaml"
    user.write_text("extends: phone\nmax_size: 8MB\nmax_drop: 0.5\n")
    name, prof = load_profile(str(user))
    assert (name, prof.max_size, prof.max_drop, prof.threads) == ("tiny-phone", "8MB", 0.5, 2)
    user.write_text("extends: phone\nmax_sise: 8MB\n")
    with pytest.raises(ConfigError, match="max_sise"):
        load_profile(str(user))
    user.write_text("extends: toaster\n")
    with pytest.raises(ConfigError, match="mcu"):
        load_profile(str(user))
    with pytest.raises(ConfigError, match="phone"):
        load_profile("watch")


def test_config_becomes_a_per_layer_recipe() -> None:
    config = {
        "fc1": choice(0.9, "codebook", 4),
        "fc2": choice(0.0, "int", 8),
        "conv1": choice(0.5, "int", 4),
        "conv2": choice(),
    }
    raw = to_recipe(check_config(config, LENET))
    rec = load_recipe(raw)  # valid recipe
    methods = [s.spec.name for s in rec.stages]
    assert methods == [
        "prune.magnitude",
        "prune.magnitude",
        "quantize.rtn",
        "quantize.rtn",
        "share.kmeans",
    ]
    assert raw["stages"][0]["targets"] == ["conv1"] and raw["format"] == {"entropy": "huffman"}
    assert trial_id("m", None, raw) == trial_id("m", None, json.loads(json.dumps(raw)))
    assert trial_id("m", None, raw) != trial_id("m", "d", raw)
    with pytest.raises(ConfigError, match="searchable layers"):
        check_config({"fc9": choice()}, LENET)
    with pytest.raises(ConfigError, match="prune"):
        check_config({"fc1": {"prune": 1.5, "quant": None}}, LENET)


class Counting:
    """run_trial with a call count; raises for the ids in ``fail`` or after ``stop_after``."""

    def __init__(self, fail: tuple[int, ...] = (), stop_after: int | None = None) -> None:
        self.calls: list[str] = []
        self.fail, self.stop_after = fail, stop_after

    def __call__(self, spec: dict[str, Any]) -> dict[str, Any]:
        if self.stop_after is not None and len(self.calls) >= self.stop_after:
            raise KeyboardInterrupt
        self.calls.append(spec["id"])
        if len(self.calls) in self.fail:
            raise RuntimeError("worker lost")
        return run_trial(spec)


def options(tmp_path: Path, trials: int) -> AutoOptions:
    return AutoOptions(
        data=tiny_npz(tmp_path / "tiny.npz"),
        workers=1,
        max_trials=trials,
        prune=(0.0, 0.8),
        quant=(None, ("int", 8), ("int", 4)),
        finetune_steps=2,
        scan="off",
        fractions=(1.0,),
    )


def search(tmp_path: Path, fn: Counting, trials: int) -> dict[str, Any]:
    budgets = Budgets(max_size="6x", max_drop=100.0)
    return auto_search(
        "builtin:lenet5-fashion",
        tmp_path / "out",
        budgets,
        options(tmp_path, trials),
        SerialRunner(fn),
    )


def lines(tmp_path: Path) -> list[dict[str, Any]]:
    text = (tmp_path / "out" / "trials.jsonl").read_text()
    return [json.loads(x) for x in text.splitlines()]


@pytest.mark.slow
def test_search_resumes_without_rerunning_and_keeps_failures(tmp_path: Path) -> None:
    first = Counting(fail=(1,))
    summary = search(tmp_path, first, 3)
    assert summary["kind"] == "slimtorch.auto" and summary["version"] == 1
    assert summary["status"] == "budget-exhausted" and summary["trials"] == 3
    recs = lines(tmp_path)
    assert [r["status"] for r in recs] == ["failed", "ok", "ok"]
    assert recs[0]["error"] == "RuntimeError: worker lost"
    dense = summary["baseline"]["dense_bytes"]
    assert summary["budgets"]["max_bytes"] == dense // 6
    for r in recs[1:]:
        assert r["meets_budget"] == (r["bytes"] <= dense // 6)
        assert abs(r["bytes"] - r["predicted_bytes"]) <= 0.05 * r["bytes"]
    best = summary["best"]
    assert best is not None
    model = api.load(tmp_path / "out" / "best")  # a normal artifact
    assert (
        api.artifact_size(tmp_path / "out" / "best")
        == next(r for r in recs if r["id"] == best)["bytes"]
    )
    assert model is not None

    second = Counting()
    summary = search(tmp_path, second, 5)
    ids = [r["id"] for r in lines(tmp_path)]
    assert len(second.calls) == 2 and not set(second.calls) & {r["id"] for r in recs}
    assert len(ids) == len(set(ids)) == 5
    front = json.loads((tmp_path / "out" / "pareto.json").read_text())["ids"]
    kept = {p.name for p in (tmp_path / "out" / "trials").iterdir()}
    assert kept == set(front) | {summary["best"]}  # artifacts off the front are deleted
    rep = report(tmp_path / "out")
    assert rep["best_trial"]["id"] == summary["best"] and rep["failed"] == 1
    by_id = {r["id"]: r for r in lines(tmp_path)}
    uni = rep["best_uniform"]  # shown as measured, not as "in the size budget"
    assert uni is not None and uni["meets_budget"] == by_id[uni["id"]]["meets_budget"]


@pytest.mark.slow
def test_interrupted_search_leaves_best_and_resumes(tmp_path: Path) -> None:
    summary = search(tmp_path, Counting(stop_after=2), 6)
    assert summary["status"] == "interrupted" and summary["trials"] == 2
    assert (tmp_path / "out" / "best" / "manifest.json").is_file()
    saved = json.loads((tmp_path / "out" / "auto.json").read_text())
    assert saved["status"] == "interrupted" and saved["best"] == summary["best"]
    again = Counting()
    summary = search(tmp_path, again, 3)
    assert len(again.calls) == 1 and summary["trials"] == 3


def test_refuses_an_earlier_search_without_resume_or_force(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "trials.jsonl").write_text("")
    opts = options(tmp_path, 1)
    opts.resume = False
    with pytest.raises(ConfigError, match="--resume"):
        auto_search("builtin:lenet5-fashion", out, Budgets(max_size="4x"), opts)
    (out / "trials.jsonl").unlink()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="empty or new"):
        auto_search("builtin:lenet5-fashion", out, Budgets(max_size="4x"), options(tmp_path, 1))
