"""``slimtorch merge CONFIG.yaml --out DIR``: merge models from a mergekit-style YAML config."""

from __future__ import annotations

import argparse
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


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run ``slimtorch merge``; returns JSON-able facts about the merge."""
    from slimtorch.workflows.merge import merge_from_config

    return merge_from_config(args.config, args.out, args.force, args.seed)


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
