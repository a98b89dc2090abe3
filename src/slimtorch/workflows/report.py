"""One self-contained HTML page and a Markdown file with charts (``slimtorch report DIR``).

DIR is an artifact (manifest.json), an automatic-search directory (auto.json, trials.jsonl,
pareto.json, best/) and/or a directory holding sensitivity.json; all present parts are shown.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from slimtorch.models.registry import load_model
from slimtorch.report import write_report


def report_dir(
    path: str | Path,
    out: str | Path | None = None,
    latency: bool = False,
    force: bool = False,
    repeats: int = 20,
    threads: int = 1,
    model: str | None = None,
    trust_factory: bool = False,
) -> dict[str, Any]:
    """Write the report of ``path`` to ``out`` (default: ``DIR-report`` beside it); returns
    what was written. ``latency`` times every leaf module ``repeats`` times on ``threads``;
    an artifact of a Python factory is loaded for it only with ``model`` (the ``--model``
    spec it was made from) or ``trust_factory``."""
    given = load_model(model).model if model is not None else None
    return write_report(path, out, latency, force, repeats, threads, trust_factory, given)
