"""The files of an ``slimtorch auto`` output directory (written atomically, read on resume).

OUT/auto.json         summary (kind slimtorch.auto, version 1): baseline, budgets, best, status
OUT/trials.jsonl      one line per finished trial (append-only; resume never reruns an id)
OUT/pareto.json       {"ids": [...]}: the non-dominated trials over (bytes, latency_ms, drop)
OUT/best/             the best trial meeting every budget: a normal slimtorch artifact
OUT/baseline.json     the uncompressed model's quality, bytes and latency (reused on resume)
OUT/sizes.json        the per-layer size table (reused on resume)
OUT/sensitivity.json  the per-layer sensitivity scan, when one ran (reused on resume)
OUT/trials/<id>/      per-trial artifacts; those off the Pareto set are deleted at the end
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Collection
from pathlib import Path
from typing import Any

from slimtorch.core.errors import ConfigError
from slimtorch.formats.atomic import swap_into_place, temp_sibling

OURS = (
    "auto.json",
    "trials.jsonl",
    "pareto.json",
    "best",
    "baseline.json",
    "sizes.json",
    "sensitivity.json",
    "trials",
)


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as JSON to ``path`` atomically (temporary file, fsync, rename)."""
    tmp = temp_sibling(path)
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def prepare(out: Path, resume: bool | None, force: bool) -> bool:
    """Make ``out`` ready; returns whether this run resumes an earlier search there."""
    has_search = (out / "trials.jsonl").is_file()
    if force:
        for name in OURS:
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
        has_search = False
    elif has_search and resume is False:
        raise ConfigError(
            f"{out} holds an earlier search (trials.jsonl); pass --resume to continue it or"
            " --force to start over"
        )
    if out.is_dir() and not has_search:
        unknown = sorted(p.name for p in out.iterdir() if p.name not in OURS)
        if unknown:
            raise ConfigError(
                f"output directory {out} holds other files ({', '.join(unknown[:5])}); choose an"
                " empty or new directory for --out"
            )
    (out / "trials").mkdir(parents=True, exist_ok=True)
    return has_search


def publish_best(out: Path, trial_id: str) -> None:
    """Copy the artifact of ``trial_id`` to ``OUT/best`` atomically."""
    source = out / "trials" / trial_id
    tmp = temp_sibling(out / "best")
    shutil.copytree(source, tmp)
    swap_into_place(tmp, out / "best", overwrite=True)


def prune_trials(out: Path, keep: Collection[str]) -> int:
    """Delete the artifacts of trials not in ``keep`` (their results stay in trials.jsonl)."""
    removed = 0
    for path in (out / "trials").iterdir():
        if path.is_dir() and path.name not in keep:
            shutil.rmtree(path)
            removed += 1
    return removed


def report(out: Path) -> dict[str, Any]:
    """``auto.json`` plus the rows the CLI and benchmarks show: the Pareto trials, the best
    trial, and the best uniform (single-recipe) trial within the size budget."""
    from slimtorch.search.pareto import best_within
    from slimtorch.search.trials import TrialStore

    summary = read_json(out / "auto.json")
    if summary is None:
        raise ConfigError(f"{out} holds no auto.json; give the --out directory of `slimtorch auto`")
    records = TrialStore(out / "trials.jsonl").load()
    front = (read_json(out / "pareto.json") or {}).get("ids", [])
    dense = summary["baseline"].get("dense_bytes") or summary["baseline"]["bytes"]

    def row(rec: dict[str, Any] | None) -> dict[str, Any] | None:
        if rec is None:
            return None
        keys = ("id", "label", "status", "bytes", "latency_ms", "quality", "drop", "meets_budget")
        out_row = {k: rec.get(k) for k in keys}
        out_row["ratio"] = dense / rec["bytes"] if rec.get("bytes") else None
        return out_row

    limit = summary["budgets"].get("max_bytes")
    uniform = [
        records[i]
        for i in summary.get("uniform", [])
        if i in records and (limit is None or (records[i].get("bytes") or limit + 1) <= limit)
    ]
    as_budget = [{**r, "meets_budget": True} for r in uniform]  # in the size budget: compared
    best_uniform = best_within(as_budget)
    return {
        **summary,
        "out": str(out),
        "dense_bytes": dense,
        "pareto": [row(records[i]) for i in front if i in records],
        "best_trial": row(records.get(summary["best"])) if summary.get("best") else None,
        "best_uniform": row(records[best_uniform["id"]]) if best_uniform else None,
        "failed": sum(1 for r in records.values() if r.get("status") != "ok"),
    }
