"""Quality lost per layer and per single choice (``slimtorch sensitivity --model M --out DIR``).

Each layer alone is pruned / quantized / weight-shared at each value and the model's own metric
is measured on a fixed subsample of calibration data. Writes ``DIR/sensitivity.json`` (read by
the auto-search and the report) and ``DIR/sensitivity.md`` (one table), each atomically.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from slimtorch.core.context import Context
from slimtorch.core.errors import UserInputError
from slimtorch.models.registry import load_model
from slimtorch.search.sensitivity import scan, task_evaluator
from slimtorch.search.sensitivity_table import most_sensitive, to_markdown, write_text_atomic

JSON_FILE = "sensitivity.json"
MARKDOWN_FILE = "sensitivity.md"


@dataclass
class SensitivityJob:
    """What to scan: the model, where to write, and the values tried for each kind."""

    model: str
    out: str | Path
    data: str | None = None
    prune: list[float] = field(default_factory=list)  # sparsities
    bits: list[float] = field(default_factory=list)  # integer bit widths 2..8
    codebook: list[float] = field(default_factory=list)  # codebook index bits 2..8
    samples: int | None = None  # items per evaluation (None: a fast subsample for the metric)
    split: Literal["calibration", "evaluation"] = "calibration"
    layers: list[str] | None = None  # exact module names (None: every layer)
    force: bool = False
    progress: bool = True


def sensitivity_to_dir(job: SensitivityJob) -> dict[str, Any]:
    """Scan ``job.model``, write the tables into ``job.out``; a JSON-able summary of them."""
    out = Path(job.out)
    if out.exists() and not out.is_dir():
        raise UserInputError(f"--out {out} is a file; give a directory")
    existing = [out / f for f in (JSON_FILE, MARKDOWN_FILE) if (out / f).exists()]
    if existing and not job.force:
        raise UserInputError(f"{existing[0]} exists; pass --force to replace it")
    loaded = load_model(job.model)
    start = time.perf_counter()
    evaluate, metric, higher = task_evaluator(
        loaded, job.data, job.samples, split=job.split, ctx=Context(progress=False)
    )
    sens = scan(
        loaded.model,
        evaluate,
        higher_is_better=higher,
        layers=job.layers,
        progress=job.progress,
        metric=metric,
        model_name=job.model,
        prune=job.prune,
        bits=job.bits,
        codebook=job.codebook,
    )
    seconds = time.perf_counter() - start
    out.mkdir(parents=True, exist_ok=True)
    sens.save(out / JSON_FILE)
    write_text_atomic(out / MARKDOWN_FILE, to_markdown(sens))
    return {
        "model": job.model,
        "metric": metric,
        "higher_is_better": higher,
        "baseline": sens.baseline,
        "layers": len(sens.layers),
        "trials": sum(len(e.points(k)) for e in sens.layers for k in ("prune", "bits", "codebook")),
        "seconds": round(seconds, 2),
        "json": str(out / JSON_FILE),
        "markdown": str(out / MARKDOWN_FILE),
        "most_sensitive": most_sensitive(sens, 5),
    }
