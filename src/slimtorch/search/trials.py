"""Trials: one measured configuration each, run by a pluggable runner, kept in an append-only log.

A trial *spec* is a plain JSON dict, so any scheduler can ship it::

    {"id": "3f2a...", "model": "builtin:lenet5-fashion", "data": "builtin:fashion-mnist",
     "eval_data": "builtin:fashion-mnist", "recipe": {...}, "out": "OUT/trials/3f2a...",
     "latency_batch": 1, "runtime": "torch", "threads": 1, "seed": 0, "input": null}

:func:`run_trial` is a top-level function of that dict alone: it compresses the model, saves the
artifact atomically into ``out``, and measures bytes on disk, latency and quality of the
*reloaded* artifact. A process pool calls it; so does a Ray task (:mod:`.ray_runner`).
It never raises: a failure comes back as ``{"status": "failed", "error": ...}``.
"""

from __future__ import annotations

import copy
import json
import logging
import multiprocessing
import os
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any, Protocol

import torch

from slimtorch.core.info import model_info, update_info

log = logging.getLogger(__name__)

TrialFn = Callable[[dict[str, Any]], dict[str, Any]]
_CACHE: dict[str, Any] = {}  # per process: the loaded source model and tasks (read-only)


def _loaded(model: str) -> Any:
    from slimtorch.models.registry import load_model

    key = f"model:{model}"
    if key not in _CACHE:
        _CACHE.clear()  # one model per process at a time
        _CACHE[key] = load_model(model)
    return _CACHE[key]


def _task(loaded: Any, data: str | None) -> Any:
    from slimtorch.calibrate.tasks import make_task, takes_tokenizer
    from slimtorch.calibrate.text import missing_tokenizer, model_tokenizer

    if data is None or loaded.task is None:
        return None
    tokenizer = model_tokenizer(loaded.source, loaded.tokenizer)  # the model's own
    if tokenizer is None and takes_tokenizer(loaded.task):
        raise missing_tokenizer(loaded.source)
    key = f"task:{loaded.task}:{data}:{tokenizer}"
    if key not in _CACHE:
        _CACHE[key] = make_task(loaded.task, data, tokenizer)
    return _CACHE[key]


def prepared_model(spec: dict[str, Any]) -> Any:
    """A fresh copy of ``spec["model"]`` carrying architecture and evaluation metadata."""

    loaded = _loaded(str(spec["model"]))
    model = copy.deepcopy(loaded.model)
    update_info(
        model,
        architecture=loaded.architecture,
        source=spec["model"],
        evaluator=loaded.evaluator,
        data=spec.get("eval_data"),
        input=spec.get("input"),
    )
    return model


def _onnx_latency(model: Any, inputs: Any, path: Path) -> float:
    from slimtorch.export.onnx.export import export_onnx

    try:
        report = export_onnx(model, inputs, path, None, True)
    finally:
        path.unlink(missing_ok=True)
    return float(report["onnxruntime_ms"])


def _measure(spec: dict[str, Any], out: Path) -> dict[str, Any]:
    from slimtorch import api
    from slimtorch.core.context import Context

    ctx = Context(seed=int(spec.get("seed", 0)), progress=False)
    model = prepared_model(spec)
    task = _task(_loaded(str(spec["model"])), spec.get("data"))
    result = api.compress(model, spec["recipe"], task, ctx, inplace=True)
    api.save(result.model, out, force=True)
    size = api.artifact_size(out)
    reloaded = api.load(out, trust_factory=True)  # written just above from spec["model"]
    batch = int(spec.get("latency_batch", 1))
    measured = api.evaluate(reloaded, ctx=ctx, latency_batch=batch)
    latency = measured.get("latency_ms")
    if spec.get("runtime") == "onnx":
        inputs = api.example_inputs_for(reloaded, model_info(reloaded).architecture or {}, batch)
        latency = _onnx_latency(reloaded, inputs, out.parent / f".{out.name}.onnx")
    return {
        "bytes": size,
        "latency_ms": latency,
        "quality": measured.get("value"),
        "metric": measured.get("metric"),
    }


def run_trial(spec: dict[str, Any]) -> dict[str, Any]:
    """Compress, save into ``spec["out"]`` (atomically), measure; never raises.

    Returns ``{"id", "status": "ok"|"failed", "bytes", "latency_ms", "quality", "metric",
    "seconds", "error"}``.
    """
    start = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(int(spec.get("threads", 1)))
    base: dict[str, Any] = {"id": spec.get("id"), "bytes": None, "latency_ms": None}
    base.update({"quality": None, "metric": None, "error": None})
    try:
        base.update(_measure(spec, Path(spec["out"])))
        base["status"] = "ok"
    except Exception as exc:  # a trial's failure is its result; the search goes on
        log.warning("trial %s failed: %s: %s", spec.get("id"), type(exc).__name__, exc)
        base.update(status="failed", error=f"{type(exc).__name__}: {exc}")
    finally:
        torch.set_num_threads(threads)
    base["seconds"] = round(time.perf_counter() - start, 3)
    return base


def failed(spec: dict[str, Any], error: str) -> dict[str, Any]:
    """The result of a trial that could not run at all (a dead worker, a raising runner)."""
    return {
        "id": spec.get("id"),
        "status": "failed",
        "bytes": None,
        "latency_ms": None,
        "quality": None,
        "metric": None,
        "seconds": 0.0,
        "error": error,
    }


class Runner(Protocol):
    """Runs trial specs and yields one result per spec, in the order they finish."""

    def run(self, specs: Sequence[dict[str, Any]]) -> Iterator[dict[str, Any]]: ...

    def close(self) -> None: ...

    def terminate(self) -> None: ...


class SerialRunner:
    """Runs trials one after another in this process (``fn`` defaults to :func:`run_trial`)."""

    def __init__(self, fn: TrialFn | None = None) -> None:
        self.fn = fn or run_trial

    def run(self, specs: Sequence[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for spec in specs:
            try:
                yield self.fn(spec)
            except Exception as exc:  # a raising trial function must not stop the search
                yield failed(spec, f"{type(exc).__name__}: {exc}")

    def close(self) -> None:
        """Nothing to release."""

    def terminate(self) -> None:
        """Nothing runs in the background."""


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)


class LocalProcessRunner:
    """Runs trials in ``workers`` spawned processes on this machine (torch threads per worker:
    ``threads``). A worker that dies fails its trials; the next batch gets a fresh pool."""

    def __init__(self, workers: int = 2, threads: int = 1, fn: TrialFn | None = None) -> None:
        self.workers, self.threads = max(1, workers), max(1, threads)
        self.fn = fn or run_trial
        self._pool: ProcessPoolExecutor | None = None

    def _executor(self) -> ProcessPoolExecutor:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(
                self.workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_init_worker,
                initargs=(self.threads,),
            )
        return self._pool

    def run(self, specs: Sequence[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        pool = self._executor()
        futures: dict[Future[dict[str, Any]], dict[str, Any]] = {
            pool.submit(self.fn, spec): spec for spec in specs
        }
        try:
            for fut in as_completed(futures):
                try:
                    yield fut.result()
                except BrokenProcessPool as exc:
                    self._pool = None
                    yield failed(futures[fut], f"worker process died: {exc}")
                except Exception as exc:
                    yield failed(futures[fut], f"{type(exc).__name__}: {exc}")
        finally:
            for fut in futures:
                fut.cancel()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def terminate(self) -> None:
        """Stop now (an interrupted search): cancel queued trials and end the workers."""
        pool, self._pool = self._pool, None
        if pool is None:
            return
        # the executor has no public kill; its worker processes are ours to end
        workers = list(getattr(pool, "_processes", {}).values())
        pool.shutdown(wait=False, cancel_futures=True)
        for proc in workers:
            proc.terminate()
        for proc in workers:
            proc.join(timeout=10)


class TrialStore:
    """``trials.jsonl``: one JSON line per finished trial, flushed and fsynced as it lands.

    Only the search process writes it. :meth:`load` skips a torn last line (a kill while
    writing) with a warning, so an interrupted search always resumes.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def load(self) -> dict[str, dict[str, Any]]:
        """Finished trials by id (the first record of an id wins)."""
        out: dict[str, dict[str, Any]] = {}
        if not self.path.is_file():
            return out
        for n, line in enumerate(self.path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                log.warning("%s line %d is not JSON (torn write?); ignored", self.path, n)
                continue
            if isinstance(record, dict) and "id" in record:
                out.setdefault(str(record["id"]), record)
        return out

    def append(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, separators=(",", ":"), sort_keys=True) + "\n"
        if self.path.is_file() and self.path.stat().st_size:
            with open(self.path, "rb") as f:  # a torn last line must not swallow this record
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    line = "\n" + line
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
