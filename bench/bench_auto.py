"""Benchmark of ``slimtorch auto`` (budget-driven per-layer compression), with a kill-and-resume.

    python bench/bench_auto.py                 # both runs below -> bench/results/auto.json
    python bench/bench_auto.py cli ARGS...     # `slimtorch auto ARGS...` (same parser and code)

1. LeNet-5 / Fashion-MNIST, --max-size 20x --max-drop 1.0 --workers 2 --max-trials 10: the search
   is sent SIGTERM once 3 trials are recorded, then the same command is rerun; the log shows
   no trial id twice.
2. MiniLM-L6 / Lee, --max-size 4x --max-drop 0.01 --workers 1 --max-trials 4.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import harness

RESULTS = harness.result_path("auto.json")
WORK = Path(os.environ.get("AUTO_BENCH_DIR", "/var/tmp/auto-bench"))
LENET = [
    "--model", "builtin:lenet5-fashion", "--data", "builtin:fashion-mnist",
    "--max-size", "20x", "--max-drop", "1.0", "--workers", "2", "--max-trials", "10",
]  # fmt: skip
MINILM = [
    "--model", "builtin:minilm", "--max-size", "4x", "--max-drop", "0.01",
    "--workers", "1", "--max-trials", "4",
]  # fmt: skip


def cli(argv: list[str]) -> int:
    """``slimtorch auto`` through its own parser (stands in until main.py registers it)."""
    from slimtorch.cli.commands import auto as cmd_auto

    parser = argparse.ArgumentParser(prog="slimtorch")
    cmd_auto.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["auto", *argv])
    result = cmd_auto.run(args)
    print(json.dumps(result, indent=1, default=str) if args.json else cmd_auto.render(result))
    return 0


def _lines(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def _command(args: list[str]) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "cli", *args]


def kill_and_resume(out: Path, args: list[str], after: int) -> dict:
    """Start the search, SIGTERM it once ``after`` trials are logged, rerun to the end."""
    cmd = _command([*args, "--out", str(out), "--force"])
    with harness.stopwatch() as first_s:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        while len(_lines(out / "trials.jsonl")) < after and proc.poll() is None:
            time.sleep(2)
        proc.send_signal(signal.SIGTERM)
        first_out, _ = proc.communicate()
    first = [r["id"] for r in _lines(out / "trials.jsonl")]
    status_after_kill = json.loads((out / "auto.json").read_text())["status"]
    best_after_kill = (out / "best" / "manifest.json").is_file()
    with harness.stopwatch() as second_s:
        second = subprocess.run(
            _command([*args, "--out", str(out)]), capture_output=True, text=True
        )
    ids = [r["id"] for r in _lines(out / "trials.jsonl")]
    return {
        "command": "slimtorch auto " + " ".join([*args, "--out", str(out)]),
        "killed_after_s": round(first_s.seconds, 1),
        "trials_before_kill": len(first),
        "status_after_kill": status_after_kill,
        "best_exists_after_kill": best_after_kill,
        "resumed_s": round(second_s.seconds, 1),
        "trials_total": len(ids),
        "trials_run_after_resume": len(ids) - len(first),
        "repeated_ids": len(ids) - len(set(ids)),
        "first_kept_in_order": ids[: len(first)] == first,
        "first_tail": first_out[-600:],
        "render": second.stdout,
        "rc": second.returncode,
        "stderr_tail": second.stderr[-1500:],
    }


def run_once(out: Path, args: list[str]) -> dict:
    with harness.stopwatch() as wall:
        done = subprocess.run(
            _command([*args, "--out", str(out), "--force"]), capture_output=True, text=True
        )
    return {
        "command": "slimtorch auto " + " ".join([*args, "--out", str(out)]),
        "wall_s": round(wall.seconds, 1),
        "rc": done.returncode,
        "render": done.stdout,
        "stderr_tail": done.stderr[-1500:],
    }


def save(key: str, run: dict) -> None:
    """Merge one run into bench/results/auto.json (re-read first: runs may go in parallel)."""
    run = harness.with_environment(run)
    harness.write_result(WORK / f"{key}.json", run, default=str)
    results: dict = harness.read_result(RESULTS, {})
    results[key] = run
    harness.write_result(RESULTS, results, default=str)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        epilog="`bench_auto.py cli ARGS...` runs `slimtorch auto ARGS...` (what the runs call)",
    )
    parser.add_argument("runs", nargs="*", help="lenet and/or minilm (default: both)")
    args = parser.parse_args(argv)
    unknown = set(args.runs) - {"lenet", "minilm"}
    if unknown:
        parser.error(f"unknown run {', '.join(sorted(unknown))}: choose lenet and/or minilm")
    from slimtorch.search.outdir import report

    WORK.mkdir(parents=True, exist_ok=True)
    which = args.runs or ["lenet", "minilm"]
    if "lenet" in which:
        run = kill_and_resume(WORK / "lenet5", LENET, after=3)
        run["report"] = report(WORK / "lenet5")
        save("lenet5_20x", run)
        print(run["render"])
    if "minilm" in which:
        run = run_once(WORK / "minilm", MINILM)
        if (WORK / "minilm" / "auto.json").is_file():
            run["report"] = report(WORK / "minilm")
        save("minilm_4x", run)
        print(run["render"], run["stderr_tail"][-500:])


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "cli":
        sys.exit(cli(sys.argv[2:]))
    main()
