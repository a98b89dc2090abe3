"""``slimtorch auto``: budget-driven automatic compression with per-layer choices.

1. measure the uncompressed model (quality, bytes on disk, latency);
2. build the per-layer size table (:mod:`slimtorch.search.sizing`) and, when it is affordable,
   a sensitivity scan (:mod:`slimtorch.search.sensitivity`); else a data-free proxy (the
   relative weight error of each choice) predicts the quality cost;
3. measure *uniform* candidates: one choice for every layer, the least aggressive pruning that
   fits the size budget for each quantizer (the best single recipe of that size);
4. measure *allocated* candidates: per-layer choices of least predicted drop under 100%, 80% and
   60% of the size budget (Lagrangian knapsack, :mod:`slimtorch.search.allocate`);
5. refine: measure the best-predicted neighbours of the best measured trial, round by round,
   until the trial or time budget is spent or no new neighbour is left.

Every trial lands in ``OUT/trials.jsonl`` as it finishes; the best trial meeting every budget is
copied to ``OUT/best`` at once, so a killed search leaves its best so far, and a rerun resumes
without repeating a finished trial. See docs/auto.md and :mod:`slimtorch.search.outdir`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slimtorch.core.errors import ConfigError
from slimtorch.search import outdir, pareto
from slimtorch.search.allocate import allocate, swaps
from slimtorch.search.candidates import Planner
from slimtorch.search.profiles import load_profile, parse_size
from slimtorch.search.ray_runner import RayRunner, RaySettings
from slimtorch.search.setup import Baseline, measure_baseline, scan_or_proxy, size_model
from slimtorch.search.space import Config, RecipeOptions, choice_key, parse_choice_key
from slimtorch.search.trials import LocalProcessRunner, Runner, SerialRunner, TrialStore

log = logging.getLogger(__name__)


@dataclass
class Budgets:
    """What the result must meet; None means unconstrained. ``max_size``: 2MB, 500KB, 20x."""

    max_size: str | int | None = None
    max_latency_ms: float | None = None
    max_drop: float | None = None


@dataclass
class AutoOptions:
    """How the search runs (everything besides model, output directory and budgets)."""

    data: str | None = None
    workers: int = 2
    max_trials: int = 24
    time_budget_s: float | None = None
    resume: bool | None = None  # None: resume when OUT holds trials.jsonl
    force: bool = False
    runtime: str = "torch"
    threads: int = 1
    latency_batch: int = 1
    profile: str | None = None
    seed: int = 0
    prune: tuple[float, ...] = (0.0, 0.5, 0.7, 0.8, 0.9, 0.95)
    quant: tuple[tuple[str, int] | None, ...] = (
        None,
        ("int", 8),
        ("int", 4),
        ("codebook", 5),
        ("codebook", 4),
    )
    finetune_steps: int = 300
    scan: str = "auto"  # auto: only when it fits scan_budget_s; on; off (proxy)
    scan_budget_s: float = 240.0
    entropy: str = "huffman"
    fractions: tuple[float, ...] = (1.0, 0.8, 0.6)
    input: dict[str, Any] | None = None
    runner: str = "local"  # local: this machine's processes; ray: Ray tasks (see ray_runner)
    ray: RaySettings = field(default_factory=RaySettings)
    extra: dict[str, Any] = field(default_factory=dict)


def resolve_budgets(budgets: Budgets, options: AutoOptions) -> tuple[Budgets, AutoOptions]:
    """Fill budgets (and latency options) from ``options.profile``; explicit values win."""
    if options.profile is None:
        return budgets, options
    _, prof = load_profile(options.profile)
    merged = Budgets(
        budgets.max_size if budgets.max_size is not None else prof.max_size,
        budgets.max_latency_ms if budgets.max_latency_ms is not None else prof.max_latency_ms,
        budgets.max_drop if budgets.max_drop is not None else prof.max_drop,
    )
    options.threads, options.latency_batch = prof.threads, prof.latency_batch
    options.runtime = prof.runtime if options.runtime == "torch" else options.runtime
    return merged, options


def check_budgets(budgets: Budgets) -> None:
    if budgets.max_size is None and budgets.max_latency_ms is None and budgets.max_drop is None:
        raise ConfigError(
            "give at least one budget: --max-size (e.g. 2MB or 20x), --max-latency-ms,"
            " --max-drop, or --profile mcu|phone|server"
        )
    if budgets.max_latency_ms is not None and not budgets.max_latency_ms > 0:
        raise ConfigError(f"--max-latency-ms must be positive, got {budgets.max_latency_ms}")
    if budgets.max_drop is not None and not budgets.max_drop >= 0:
        raise ConfigError(
            f"--max-drop must be >= 0 (the quality loss allowed, in the model's metric), got"
            f" {budgets.max_drop}"
        )


@dataclass
class _State:
    out: Path
    model: str
    base: Baseline
    max_bytes: int | None
    budgets: Budgets
    options: AutoOptions
    store: TrialStore
    records: dict[str, dict[str, Any]]
    uniform: list[str] = field(default_factory=list)
    best: str | None = None
    started: float = field(default_factory=time.monotonic)

    def judge(self, rec: dict[str, Any]) -> dict[str, Any]:
        """``drop`` and ``meets_budget`` of a record under this run's baseline and budgets."""
        q = rec.get("quality")
        drop: float | None = None
        if rec.get("status") == "ok" and q is not None:
            b = self.base.quality
            drop = b - float(q) if self.base.higher_is_better else float(q) - b
        fits = drop is not None
        if fits and self.max_bytes is not None:
            fits = rec["bytes"] <= self.max_bytes
        lat, max_lat = rec.get("latency_ms"), self.budgets.max_latency_ms
        if fits and max_lat is not None:
            fits = lat is not None and lat <= max_lat
        if fits and self.budgets.max_drop is not None:
            fits = drop <= self.budgets.max_drop  # type: ignore[operator]
        return {**rec, "drop": drop, "meets_budget": bool(fits)}

    def summary(self, status: str) -> dict[str, Any]:
        return {
            "kind": "slimtorch.auto",
            "version": 1,
            "model": self.model,
            "data": self.options.data,
            "metric": self.base.metric,
            "higher_is_better": self.base.higher_is_better,
            "baseline": {
                "quality": self.base.quality,
                "bytes": self.base.bytes,
                "latency_ms": self.base.latency_ms,
                "dense_bytes": self.base.dense_bytes,
            },
            "budgets": {
                "max_bytes": self.max_bytes,
                "max_latency_ms": self.budgets.max_latency_ms,
                "max_drop": self.budgets.max_drop,
            },
            "profile": self.options.profile,
            "best": self.best,
            "status": status,
            "trials": len(self.records),
            "uniform": self.uniform,
            "runtime": self.options.runtime,
        }

    def save(self, status: str) -> dict[str, Any]:
        summary = self.summary(status)
        outdir.write_json(self.out / "pareto.json", {"ids": pareto.pareto_front(self.judged())})
        outdir.write_json(self.out / "auto.json", summary)
        return summary

    def judged(self) -> list[dict[str, Any]]:
        return [self.judge(r) for r in self.records.values()]

    def add(self, rec: dict[str, Any]) -> None:
        rec = self.judge(rec)
        self.store.append(rec)
        self.records[rec["id"]] = rec
        best = pareto.best_within(self.judged())
        if best is not None and best["id"] != self.best:
            outdir.publish_best(self.out, str(best["id"]))
            self.best = str(best["id"])
        log.info(
            "trial %s (%s): %s bytes=%s drop=%s%s",
            rec["id"],
            rec.get("label"),
            rec["status"],
            rec.get("bytes"),
            None if rec["drop"] is None else round(rec["drop"], 4),
            " meets budget" if rec["meets_budget"] else "",
        )
        self.save("interrupted")  # until the search ends, a kill leaves "interrupted"

    def out_of_budget(self) -> bool:
        if len(self.records) >= self.options.max_trials:
            return True
        limit = self.options.time_budget_s
        return limit is not None and time.monotonic() - self.started >= limit


def make_runner(options: AutoOptions) -> Runner:
    """The runner ``options.runner`` names (nothing starts until its first trial)."""
    if options.runner == "ray":
        return RayRunner(options.ray, options.workers, options.threads)
    if options.runner != "local":
        raise ConfigError(f"--runner must be local or ray, got {options.runner!r}")
    if options.workers <= 1:
        return SerialRunner()
    return LocalProcessRunner(options.workers, options.threads)


def run_candidates(
    state: _State, runner: Runner, plan: Planner, configs: Sequence[tuple[Config, str]]
) -> int:
    """Run the configurations not yet measured (up to the trial budget); returns how many ran."""
    specs, seen = [], set(state.records)
    for config, label in configs:
        spec = plan.spec(config, label)
        if spec["id"] in seen:
            continue
        seen.add(spec["id"])
        specs.append(spec)
    specs = specs[: max(0, state.options.max_trials - len(state.records))]
    by_id = {s["id"]: s for s in specs}
    for result in runner.run(specs):
        state.add({**result, **plan.meta[by_id[result["id"]]["id"]]})
        if state.out_of_budget() and state.options.time_budget_s is not None:
            runner.terminate()
            break
    return len(specs)


def _refine(state: _State, runner: Runner, plan: Planner) -> str:
    """Rounds of neighbours of the best measured trial; returns the final status."""
    while not state.out_of_budget():
        plan.calibrate(state.judged())
        anchor = plan.anchor(state.judged())
        if anchor is None:
            return "complete"
        assign = {layer: choice_key(c) for layer, c in anchor["config"].items()}
        n = max(1, state.options.workers)
        neighbours = swaps(plan.costs, assign, plan.layer_budget(1.0), 4 * n)
        fresh = [
            ({layer: parse_choice_key(k) for layer, k in a.items()}, "refine") for a in neighbours
        ]
        fresh = [(c, label) for c, label in fresh if plan.spec(c, label)["id"] not in state.records]
        if not fresh:
            return "complete"
        run_candidates(state, runner, plan, fresh[:n])
    return "budget-exhausted"


def auto_search(
    model: str,
    out: str | Path,
    budgets: Budgets,
    options: AutoOptions | None = None,
    runner: Runner | None = None,
) -> dict[str, Any]:
    """Search per-layer pruning, quantization and weight sharing for ``model`` under ``budgets``;
    returns the summary written to ``OUT/auto.json`` (see the module doc)."""
    options = options or AutoOptions()
    budgets, options = resolve_budgets(budgets, options)
    check_budgets(budgets)
    if options.runtime not in ("torch", "onnx"):
        raise ConfigError(f"--runtime must be torch or onnx, got {options.runtime!r}")
    runner = runner or make_runner(options)  # before OUT is touched: a missing Ray exits clean
    out = Path(out)
    outdir.prepare(out, options.resume, options.force)
    base, loaded = measure_baseline(model, out, options)
    max_bytes = None if budgets.max_size is None else parse_size(budgets.max_size, base.dense_bytes)
    store = TrialStore(out / "trials.jsonl")
    state = _State(out, model, base, max_bytes, budgets, options, store, store.load())
    state.records = {k: state.judge(v) for k, v in state.records.items()}
    found = pareto.best_within(state.judged())
    state.best = None if found is None else str(found["id"])
    state.save("interrupted")
    sizes = size_model(loaded, out, options, base)
    costs = scan_or_proxy(loaded, out, options, sizes)
    recipe_options = RecipeOptions(
        finetune_steps=options.finetune_steps if options.data and loaded.task else 0,
        entropy=options.entropy,
    )
    target = max_bytes if max_bytes is not None else base.dense_bytes // 4
    plan = Planner(model, out, options, sizes, costs, recipe_options, target)
    status = "interrupted"
    try:
        uniform = plan.uniform()
        state.uniform = [plan.spec(c, label)["id"] for c, label in uniform]
        allocated = [
            (c, f"allocated {f:.0%}")
            for f in options.fractions
            if (c := plan.allocated(f, allocate)) is not None
        ]
        run_candidates(state, runner, plan, [*uniform, *allocated])
        status = "budget-exhausted" if state.out_of_budget() else _refine(state, runner, plan)
    except KeyboardInterrupt:
        log.warning("search interrupted: rerun the same command to resume")
        runner.terminate()
        return state.save("interrupted")
    finally:
        runner.close()
    keep = set(pareto.pareto_front(state.judged())) | ({state.best} if state.best else set())
    outdir.prune_trials(out, keep)
    return state.save(status)
