"""Merge models from a mergekit-style YAML config (``slimtorch merge CONFIG --out DIR``)."""

from __future__ import annotations

import resource
import sys
import time
from pathlib import Path
from typing import Any

from slimtorch.merge import load_config, merge_to_dir


def _peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def merge_from_config(
    config: str | Path, out: str | Path, force: bool = False, seed: int = 0
) -> dict[str, Any]:
    """Merge the models ``config`` names (paths relative to its directory) into ``out``;
    JSON-able facts about the merge, with its time and this process's peak memory."""
    path = Path(config)
    parsed = load_config(path)
    start = time.perf_counter()
    report = merge_to_dir(parsed, out, force, seed, path.resolve().parent)
    report["seconds"] = round(time.perf_counter() - start, 3)
    report["peak_rss_mb"] = round(_peak_rss_mb(), 1)
    return report
