"""`slimtorch merge CONFIG.yaml --out DIR`: merge models from a mergekit-style YAML config."""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path
from typing import Any


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Add the ``merge`` subcommand to the ``sub`` subparsers of the main parser."""
    p: argparse.ArgumentParser = sub.add_parser(
        "merge",
        help="merge models (linear, slerp, task_arithmetic, ties, dare_linear, dare_ties)"
        " from a mergekit YAML config, one tensor at a time",
    )
    p.add_argument("config", help="mergekit-style YAML: merge_method, base_model, models, ...")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.add_argument("--seed", type=int, default=0, help="seed of DARE's random drops")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    return p


def _peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run ``slimtorch merge``; returns JSON-able facts about the merge."""
    from slimtorch.merge import load_config, merge_to_dir  # lazy: keeps `slimtorch --help` fast

    path = Path(args.config)
    config = load_config(path)
    start = time.perf_counter()
    report = merge_to_dir(config, args.out, args.force, args.seed, path.resolve().parent)
    report["seconds"] = round(time.perf_counter() - start, 3)
    report["peak_rss_mb"] = round(_peak_rss_mb(), 1)
    return report


def render(result: dict[str, Any]) -> str:
    """Plain-text summary of :func:`run`'s result."""
    lines = [
        f"merged {len(result['models'])} models with {result['method']}"
        + (f" (base {result['base_model']})" if result.get("base_model") else ""),
        f"tensors: {result['tensors_merged']} merged, {result['tensors_copied']} copied",
        f"wrote {result['out']} ({result['output_format']}, {result['bytes_on_disk']:,} bytes)",
        f"time {result['seconds']} s, peak RSS {result['peak_rss_mb']} MB",
    ]
    return "\n".join(lines)
