"""Search per-layer compression under size, latency and quality budgets (``slimtorch auto``).

Rerunning the same job resumes (finished trials are not repeated); ``force`` starts over. The
best artifact meeting every budget is ``OUT/best`` (docs/auto.md describes every file).
"""

from __future__ import annotations

import logging
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slimtorch.core.errors import ConfigError
from slimtorch.search import outdir
from slimtorch.search.auto import AutoOptions, Budgets, auto_search
from slimtorch.search.profiles import parse_duration
from slimtorch.search.ray_runner import RaySettings
from slimtorch.workflows.auto_bpw import BpwJob, auto_bpw  # noqa: F401 (--max-bpw / --to gguf)


@dataclass
class AutoJob:
    """One automatic search: the model, the budgets, and how the search runs."""

    model: str
    out: str
    data: str | None = None  # training data for the short fine-tuning after pruning
    max_size: str | None = None  # 2MB, 500KB, 512KiB, or 20x (fp32 / 20)
    max_latency_ms: float | None = None
    max_drop: float | None = None  # quality loss allowed, in the model's metric
    profile: str | None = None  # mcu, phone, server, or a YAML file of budgets
    workers: int = 2
    max_trials: int = 24
    time_budget: str | None = None  # 600, 90s, 10m, 1h
    resume: bool | None = None  # None: resume when OUT holds trials.jsonl
    force: bool = False
    runtime: str = "torch"
    seed: int = 0
    verbose: bool = True  # log each trial
    runner: str = "local"  # local (this machine's processes) or ray (Ray tasks)
    ray: RaySettings | None = None  # --ray-address, --ray-cpus-per-trial, --ray-gpus-per-trial


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def auto_to_dir(job: AutoJob) -> dict[str, Any]:
    """Run (or resume) the search into ``job.out``; the report of OUT (auto.json plus Pareto
    rows). SIGTERM stops it like Ctrl-C, keeping the trials already done."""
    if job.workers < 1 or job.max_trials < 1:
        raise ConfigError("--workers and --max-trials must be at least 1")
    options = AutoOptions(
        data=job.data,
        workers=job.workers,
        max_trials=job.max_trials,
        time_budget_s=parse_duration(job.time_budget),
        resume=job.resume,
        force=job.force,
        runtime=job.runtime,
        profile=job.profile,
        seed=job.seed,
        prune=None,  # type: ignore[arg-type]  # None: the grid follows the model's size
        quant=None,  # type: ignore[arg-type]
        runner=job.runner,
        ray=job.ray or RaySettings(),
    )
    budgets = Budgets(job.max_size, job.max_latency_ms, job.max_drop)
    if job.verbose:
        logging.getLogger("slimtorch.search.auto").setLevel(logging.INFO)
    previous = signal.signal(signal.SIGTERM, _interrupt)  # kill -TERM: stop, keep what is done
    try:
        auto_search(job.model, job.out, budgets, options)
    finally:
        signal.signal(signal.SIGTERM, previous)
    return outdir.report(Path(job.out))
