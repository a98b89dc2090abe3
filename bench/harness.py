"""The shared bench harness: environment record, interleaved latency, result files, Markdown tables.

Every script in bench/ uses it (they run as ``python bench/NAME.py``, so ``import harness``
finds this file):

* :func:`environment`: what ran the benchmark (date, git commit, Python, torch, slimtorch and
  other package versions, CPU model, cores, torch threads); stored with every result.
* :func:`interleaved`: median and fastest milliseconds of several callables timed in turns, so
  that load from other processes on a shared machine hits all of them alike.
* :func:`stopwatch` (wall seconds of a block) and :func:`timed` (repeated calls of one callable).
* :func:`result_path`, :func:`read_result`, :func:`write_result`, :func:`save_result`: JSON files
  under bench/results/ (``SLIMTORCH_BENCH_RESULTS`` points elsewhere: ``run_all.py --quick``
  writes there, so a smoke run never overwrites the recorded results).
* :func:`markdown_table`: a GitHub table from a header and rows of already formatted cells.

Only the standard library is imported here; torch and slimtorch are read when a record is made,
so the peer runners in other virtual environments can use the harness too.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS_ENV = "SLIMTORCH_BENCH_RESULTS"
# Recorded with every result; a script names its peers on top (``environment(packages=...)``).
PACKAGES = ("numpy", "safetensors", "transformers")
NOT_INSTALLED = "not installed"

T = TypeVar("T")


# ---------------------------------------------------------------- environment


def versions(names: Iterable[str], missing: str = NOT_INSTALLED) -> dict[str, str]:
    """``{distribution: version}``; ``missing`` for a distribution that is not installed."""
    out = {}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = missing
    return out


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo; ``platform.processor()`` or the architecture
    where there is none."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(
            ["git", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=20
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def git_commit() -> dict[str, Any]:
    """``{"commit": sha or None, "dirty": tracked files changed since it, or None}``."""
    sha = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no") if sha else None
    return {"commit": sha, "dirty": None if status is None else bool(status)}


def environment(packages: Iterable[str] = ()) -> dict[str, Any]:
    """What ran the benchmark, as one JSON-able record.

    ``threads`` is torch's intra-op thread count at the time of the call: make the record
    where the measurement's setting holds (scripts set it first thing in ``main``).
    """
    import torch

    git = git_commit()
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git["commit"],
        "git_dirty": git["dirty"],
        "command": " ".join(["python", *sys.argv]),
        "python": platform.python_version(),
        "torch": str(torch.__version__),
        "slimtorch": versions(["slimtorch"])["slimtorch"],
        "packages": versions(dict.fromkeys([*PACKAGES, *packages])),
        "cpu": cpu_model(),
        "machine": platform.machine(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
    }


# ---------------------------------------------------------------- timing


class Stopwatch:
    """Wall seconds since it was made; frozen by :meth:`stop` (or the end of its ``with``)."""

    def __init__(self) -> None:
        self._start = time.perf_counter()
        self._end: float | None = None

    def stop(self) -> float:
        self._end = time.perf_counter()
        return self.seconds

    @property
    def seconds(self) -> float:
        end = time.perf_counter() if self._end is None else self._end
        return end - self._start

    @property
    def ms(self) -> float:
        return self.seconds * 1000.0

    def __enter__(self) -> Stopwatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def stopwatch() -> Stopwatch:
    """A running :class:`Stopwatch`: ``with stopwatch() as sw: ...`` then ``sw.seconds`` (also
    set when the block raises), or ``wall = stopwatch()`` and ``wall.seconds`` at any time."""
    return Stopwatch()


@dataclass
class Timing:
    """Milliseconds of one callable, one sample per timed round."""

    samples_ms: list[float] = field(default_factory=list)

    @property
    def runs(self) -> int:
        return len(self.samples_ms)

    @property
    def median(self) -> float:
        """Median milliseconds: what a run typically costs on the machine as it was."""
        return float(statistics.median(self.samples_ms))

    @property
    def fastest(self) -> float:
        """Fastest milliseconds: on a shared machine the steadier estimate of the bare cost."""
        return min(self.samples_ms)

    @property
    def total_s(self) -> float:
        return sum(self.samples_ms) / 1000.0

    def summary(self, digits: int = 3) -> dict[str, float]:
        """``{"median": ms, "min": ms}`` rounded to ``digits``."""
        return {"median": round(self.median, digits), "min": round(self.fastest, digits)}


def _ms(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1000.0


def interleaved(
    calls: Mapping[str, Callable[[], object]],
    rounds: int,
    *,
    warmup: int = 3,
    slow_warmup_s: float | None = None,
    repeat: int = 1,
    round_warmup: int = 0,
    budget_s: float | None = None,
    min_runs: int = 3,
) -> dict[str, Timing]:
    """Time every callable in turns: ``rounds`` rounds, each gives every callable its turn.

    Before the first round each callable runs ``warmup`` times untimed, one after the other
    (with ``slow_warmup_s``: no further warm-up call after one that took that many seconds).
    In a round a callable first runs ``round_warmup`` times untimed, then ``repeat`` timed
    times; the round's sample is the median of those. With ``budget_s`` a callable that has
    ``min_runs`` samples adding up to more than ``budget_s`` seconds sits out the later rounds
    (its :attr:`Timing.runs` says how many it got). Settings such as ``torch.inference_mode``,
    eval mode or the thread count are the caller's: they hold for every call alike.
    """
    if rounds < 1 or repeat < 1:
        raise ValueError(f"rounds and repeat must be >= 1 (got {rounds}, {repeat})")
    slow_ms = float("inf") if slow_warmup_s is None else slow_warmup_s * 1000.0
    for fn in calls.values():
        for _ in range(warmup):
            if _ms(fn) >= slow_ms:
                break
    out = {name: Timing() for name in calls}
    for _ in range(rounds):
        for name, fn in calls.items():
            timing = out[name]
            if budget_s is not None and timing.runs >= min_runs and timing.total_s > budget_s:
                continue
            for _ in range(round_warmup):
                fn()
            timing.samples_ms.append(statistics.median([_ms(fn) for _ in range(repeat)]))
    return out


def timed(fn: Callable[[], T], repeats: int = 1) -> tuple[T, Timing]:
    """Call ``fn`` ``repeats`` times in a row: (the last call's result, the times)."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1 (got {repeats})")
    timing = Timing()
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        timing.samples_ms.append((time.perf_counter() - start) * 1000.0)
    return result, timing


# ---------------------------------------------------------------- result files


def results_dir() -> Path:
    """bench/results/, or the folder named by ``SLIMTORCH_BENCH_RESULTS``."""
    return Path(os.environ.get(RESULTS_ENV) or HERE / "results")


def result_path(name: str) -> Path:
    """Where the result file ``name`` goes (see :func:`results_dir`)."""
    return results_dir() / name


def read_result(path: Path, default: T) -> Any | T:
    """The JSON in ``path``, or ``default`` when there is no such file (a first run)."""
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else default


def write_result(path: Path, data: Any, *, indent: int = 1, **dumps: Any) -> Path:
    """Write ``data`` as JSON (and a final newline) to ``path``, atomically: a crash or a
    parallel reader never sees half a file. ``dumps``: more ``json.dumps`` options."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=indent, **dumps) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def with_environment(record: Mapping[str, Any], packages: Iterable[str] = ()) -> dict[str, Any]:
    """``record`` plus ``"environment"``: :func:`environment` now."""
    return {**record, "environment": environment(packages)}


def save_result(
    path: Path, record: Mapping[str, Any], *, packages: Iterable[str] = (), **options: Any
) -> Path:
    """:func:`write_result` of ``record`` with the environment record added."""
    return write_result(path, with_environment(record, packages), **options)


# ---------------------------------------------------------------- Markdown


def markdown_table(
    header: Sequence[str], rows: Iterable[Sequence[object]], align: str | None = None
) -> str:
    """A GitHub Markdown table. ``align``: one letter per column, ``l`` or ``r`` (default all
    ``l``); cells are written with ``str`` (format numbers before); a short row is padded with
    empty cells."""
    align = align or "l" * len(header)
    if len(align) != len(header) or set(align) - {"l", "r"}:
        raise ValueError(f"align needs one of 'l'/'r' per column: {align!r} for {len(header)}")
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "".join("---:|" if a == "r" else "---|" for a in align),
    ]
    for row in rows:
        if len(row) > len(header):
            raise ValueError(f"row has {len(row)} cells, the header {len(header)}: {row}")
        cells = [str(c) for c in row] + [""] * (len(header) - len(row))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
