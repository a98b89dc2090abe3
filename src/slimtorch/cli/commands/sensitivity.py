"""``slimtorch sensitivity --model M --out DIR``: quality lost per layer and per single choice.

    slimtorch sensitivity --model builtin:lenet5-fashion --out sens/
    slimtorch sensitivity --model builtin:minilm --out sens/ --samples 12 \\
        --prune 0.5,0.9 --bits 8,4,2 --codebook 4

Writes ``DIR/sensitivity.json`` (read by the auto-search and the report) and
``DIR/sensitivity.md`` (one table); see :mod:`slimtorch.workflows.sensitivity`.
"""

from __future__ import annotations

import argparse
from typing import Any

from slimtorch.core.errors import UserInputError


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Add the ``sensitivity`` subcommand to the ``sub`` subparsers of the main parser."""
    p: argparse.ArgumentParser = sub.add_parser(
        "sensitivity",
        help="per-layer sensitivity: quality against sparsity, bits and codebook size",
    )
    p.add_argument(
        "--model",
        required=True,
        help="builtin:NAME, a local HF directory, a Llama-family .gguf file, or pkg.mod:factory",
    )
    p.add_argument("--data", help="dataset to measure on (default: the model's own)")
    p.add_argument("--out", required=True, help="directory for sensitivity.json and .md")
    p.add_argument("--prune", default="0.3,0.5,0.7,0.9", help="sparsities, comma-separated")
    p.add_argument("--bits", default="8,6,4,3,2", help="integer bit widths 2..8 ('' for none)")
    p.add_argument("--codebook", default="8,6,4,3,2", help="codebook index bits 2..8")
    p.add_argument(
        "--samples",
        type=int,
        help="items per evaluation (images, Lee documents, characters or tokens); default:"
        " a fast subsample for the model's metric",
    )
    p.add_argument(
        "--split",
        choices=("calibration", "evaluation"),
        default="calibration",
        help="measure on the training split (default) or the evaluation split",
    )
    p.add_argument("--layers", nargs="+", help="exact module names (default: every layer)")
    p.add_argument("--force", action="store_true", help="replace existing tables in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    return p


def parse_values(text: str | None, option: str) -> list[float]:
    """``"0.5,0.9"`` -> ``[0.5, 0.9]``; empty or ``none`` -> ``[]``."""
    if text is None or text.strip().lower() in ("", "none"):
        return []
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserInputError(
            f"{option} {text!r} must be comma-separated numbers, e.g. {option} 0.5,0.9"
        ) from None


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run ``slimtorch sensitivity``; returns a JSON-able summary of what it wrote."""
    from slimtorch.workflows.sensitivity import SensitivityJob, sensitivity_to_dir

    layers = [n for item in args.layers for n in item.split(",") if n] if args.layers else None
    job = SensitivityJob(
        model=args.model,
        out=args.out,
        data=args.data,
        prune=parse_values(args.prune, "--prune"),
        bits=parse_values(args.bits, "--bits"),
        codebook=parse_values(args.codebook, "--codebook"),
        samples=args.samples,
        split=args.split,
        layers=layers,
        force=args.force,
        progress=not args.quiet,
    )
    return sensitivity_to_dir(job)


def render(result: dict[str, Any]) -> str:
    """Plain-text summary of :func:`run`'s result."""
    direction = "higher" if result["higher_is_better"] else "lower"
    lines = [
        f"{result['model']}: baseline {result['metric']} {result['baseline']:.6g}"
        f" ({direction} is better); {result['trials']} trials over {result['layers']} layers"
        f" in {result['seconds']:.1f} s",
        f"wrote {result['json']} and {result['markdown']}",
        "most sensitive:",
    ]
    for row in result["most_sensitive"]:
        lines.append(
            f"  {row['layer']} {row['kind']} {row['value']:g}: {result['metric']}"
            f" {row['quality']:.6g} (drop {row['drop']:+.4g})"
        )
    return "\n".join(lines)
