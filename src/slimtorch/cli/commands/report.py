"""``slimtorch report DIR``: one self-contained HTML page and a Markdown file with charts.

    slimtorch report out/                  # artifact: per-layer table, size breakdown
    slimtorch report out/ --latency        # ... and the per-module forward time
    slimtorch report auto-run/ --out rep/  # automatic search: Pareto front, trials, best

DIR is an artifact (manifest.json), an automatic-search directory (auto.json, trials.jsonl,
pareto.json, best/) and/or a directory holding sensitivity.json; all present parts are shown.
An eval.json in an artifact directory (``slimtorch eval DIR --json > DIR/eval.json``) adds the
measured quality and latency.
"""

from __future__ import annotations

import argparse
from typing import Any

from slimtorch.cli.options import add_trust


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Add the ``report`` subcommand to the ``sub`` subparsers of the main parser."""
    p: argparse.ArgumentParser = sub.add_parser(
        "report",
        help="HTML + Markdown report of an artifact, an automatic search or a sensitivity run",
    )
    p.add_argument(
        "dir", help="an artifact, automatic-search or sensitivity directory (see the docs)"
    )
    p.add_argument(
        "--out",
        help="directory for report.html, report.md and its PNGs (default: DIR-report beside DIR)",
    )
    p.add_argument(
        "--latency",
        action="store_true",
        help="load the artifact and time every leaf module on its example inputs",
    )
    p.add_argument(
        "--repeats", type=int, default=20, help="forward passes timed for --latency (median)"
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads for --latency (default 1)")
    p.add_argument("--force", action="store_true", help="replace --out if it holds a report")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    add_trust(p)
    return p


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run ``slimtorch report``; returns what was written."""
    from slimtorch.workflows.report import report_dir

    return report_dir(
        args.dir,
        args.out,
        args.latency,
        args.force,
        args.repeats,
        args.threads,
        model=args.model,
        trust_factory=args.trust_factory,
    )


def render(result: dict[str, Any]) -> str:
    """Plain-text summary of :func:`run`'s result."""
    parts = ", ".join(result["contains"])
    lines = [
        f"report of {result['dir']} ({parts}{', latency' if result['latency'] else ''})",
        f"  {result['html']} ({result['html_bytes']:,} bytes, self-contained)",
        f"  {result['markdown']} (+ {len(result['images'])} PNG charts beside it)",
    ]
    return "\n".join(lines)
