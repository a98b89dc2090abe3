"""``slimtorch auto --runner ray``: the same trials, best and resume as the local runner (slow:
a local Ray instance, from the bench environment), and a clean exit 2 without Ray."""

import json
import signal
import sys
from pathlib import Path
from typing import Any

import pytest
from test_trials import LENET, spec, tiny_npz

from slimtorch import api
from slimtorch.cli.main import main
from slimtorch.search.auto import AutoOptions, Budgets, auto_search
from slimtorch.search.ray_runner import (
    FILES,
    INSTALL,
    RayRunner,
    RaySettings,
    land,
    portable,
    ray_trial,
)
from slimtorch.search.space import choice, to_recipe, uniform


def test_runner_ray_without_ray_exits_2_with_the_install_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    out = tmp_path / "out"
    argv = ["auto", "--model", "builtin:lenet5-fashion", "--max-size", "4x", "--out", str(out)]
    assert main([*argv, "--runner", "ray"]) == 2
    err = capsys.readouterr().err
    assert INSTALL in err and "Traceback" not in err
    assert not out.exists()  # refused before anything was written


def test_a_worker_without_the_shared_folder_ships_the_artifact_back(tmp_path: Path) -> None:
    s = spec(tmp_path, to_recipe(uniform(LENET, choice(0.5, "int", 8))))
    result = ray_trial(s, str(tmp_path / "no-token-here"), "abc")
    assert result["status"] == "ok", result["error"]
    assert not Path(s["out"]).exists() and "manifest.json" in result[FILES]
    landed = land(result, s["out"])
    assert FILES not in landed and landed["bytes"] == api.artifact_size(s["out"])
    assert api.load(s["out"]) is not None
    json.dumps(landed)  # plain JSON again, for trials.jsonl
    bad = land({"id": "x", FILES: {"../evil": b"x"}}, str(tmp_path / "trials" / "x"))
    assert bad["status"] == "failed" and "escapes" in bad["error"]
    assert not (tmp_path / "evil").exists() and not (tmp_path / "trials" / "x").exists()


def test_a_worker_that_sees_the_token_writes_in_place(tmp_path: Path) -> None:
    s = spec(tmp_path, to_recipe(uniform(LENET, choice(0.0, "int", 8))))
    token = tmp_path / ".token"
    token.write_text("abc")
    result = ray_trial(s, str(token), "abc")
    assert result["status"] == "ok" and FILES not in result
    assert result["bytes"] == api.artifact_size(s["out"])


def test_specs_shipped_to_ray_carry_absolute_paths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # a Ray worker runs elsewhere: relative paths would break
    (tmp_path / "d.npz").write_bytes(b"")
    raw = {"out": "runs/x/trials/a", "model": "builtin:lenet5-fashion", "data": "d.npz"}
    s = portable({**raw, "eval_data": None})
    assert s["out"] == str(tmp_path / "runs" / "x" / "trials" / "a")
    assert s["data"] == str(tmp_path / "d.npz") and s["model"] == "builtin:lenet5-fashion"
    assert s["eval_data"] is None and raw["out"] == "runs/x/trials/a"  # the spec is a copy


def _options(tmp_path: Path, trials: int, runner: str) -> AutoOptions:
    return AutoOptions(
        data=tiny_npz(tmp_path / "tiny.npz"),
        workers=2,
        max_trials=trials,
        prune=(0.0, 0.8),
        quant=(None, ("int", 8), ("int", 4)),
        finetune_steps=2,
        scan="off",
        fractions=(1.0,),
        runner=runner,
        ray=RaySettings(cpus_per_trial=1),
    )


def _search(tmp_path: Path, out: str, trials: int, runner: str) -> dict[str, Any]:
    budgets = Budgets(max_size="6x", max_drop=100.0)
    opts = _options(tmp_path, trials, runner)
    return auto_search("builtin:lenet5-fashion", tmp_path / out, budgets, opts)


def _trials(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (path / "trials.jsonl").read_text().splitlines()]


def _measured(recs: list[dict[str, Any]]) -> dict[str, tuple[Any, ...]]:
    """What must not depend on the runner (latency and seconds are timings)."""
    keys = ("status", "bytes", "quality", "label", "predicted_bytes", "meets_budget")
    return {r["id"]: tuple(r[k] for k in keys) for r in recs}


@pytest.fixture
def local_ray() -> Any:
    ray = pytest.importorskip("ray")
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        _node_ip_address="127.0.0.1",
        logging_level="warning",
    )
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.mark.slow
def test_ray_runner_gives_the_local_trials_and_best_and_resumes(
    tmp_path: Path, local_ray: Any
) -> None:
    local = _search(tmp_path, "local", 5, "local")
    first = _search(tmp_path, "ray", 3, "ray")  # an interrupted search, say
    assert first["status"] == "budget-exhausted" and first["trials"] == 3
    before = _trials(tmp_path / "ray")
    again = _search(tmp_path, "ray", 5, "ray")  # resumed: only the 2 missing trials run
    after = _trials(tmp_path / "ray")
    assert after[:3] == before and len(after) == len({r["id"] for r in after}) == 5
    assert _measured(after) == _measured(_trials(tmp_path / "local"))
    assert again["best"] == local["best"] is not None
    assert again["uniform"] == local["uniform"]
    best = tmp_path / "ray" / "best"
    assert api.artifact_size(best) == next(r for r in after if r["id"] == again["best"])["bytes"]
    assert not list((tmp_path / "ray" / "trials").glob(".ray-shared-*"))  # token removed
    assert local_ray.is_initialized()  # a Ray instance the runner joined is left running


@pytest.mark.slow
def test_cli_runner_ray_starts_and_stops_its_own_local_ray(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ray = pytest.importorskip("ray")
    assert not ray.is_initialized()
    out = tmp_path / "out"
    data = tiny_npz(tmp_path / "tiny.npz")
    argv = ["auto", "--model", "builtin:lenet5-fashion", "--data", data, "--max-size", "6x"]
    argv += ["--max-drop", "100", "--max-trials", "2", "--out", str(out), "--json"]
    assert main([*argv, "--runner", "ray", "--ray-cpus-per-trial", "1"]) == 0
    assert not ray.is_initialized()  # the runner shut down the instance it started
    result = json.loads(capsys.readouterr().out)
    assert result["trials"] == 2 and result["failed"] == 0
    assert [r["status"] for r in _trials(out)] == ["ok", "ok"]


@pytest.mark.slow
def test_starting_ray_keeps_the_searchs_sigterm_handler() -> None:
    ray = pytest.importorskip("ray")

    def mine(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, mine)
    runner = RayRunner(RaySettings(), workers=1)
    try:
        runner._start()
        assert ray.is_initialized() and signal.getsignal(signal.SIGTERM) is mine
    finally:
        runner.close()
        signal.signal(signal.SIGTERM, previous)
    assert not ray.is_initialized()
