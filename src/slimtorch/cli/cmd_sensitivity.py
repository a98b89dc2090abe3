"""``slimtorch sensitivity --model M --out DIR``: quality lost per layer and per single choice.

    slimtorch sensitivity --model builtin:lenet5-fashion --out sens/
    slimtorch sensitivity --model builtin:minilm --out sens/ --samples 12 \\
        --prune 0.5,0.9 --bits 8,4,2 --codebook 4

Each layer alone is pruned / quantized / weight-shared at each value and the model's own metric
is measured on a fixed subsample of calibration data. Writes ``DIR/sensitivity.json`` (read by
the auto-search and the report) and ``DIR/sensitivity.md`` (one table), each atomically.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

JSON_FILE = "sensitivity.json"
MARKDOWN_FILE = "sensitivity.md"


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Add the ``sensitivity`` subcommand to the ``sub`` subparsers of the main parser."""
    p: argparse.ArgumentParser = sub.add_parser(
        "sensitivity",
        help="per-layer sensitivity: quality against sparsity, bits and codebook size",
    )
    p.add_argument(
        "--model", required=True, help="builtin:NAME, a local HF directory, or pkg.mod:factory"
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
    from slimtorch.core.errors import UserInputError

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
    import time

    from slimtorch.core.context import Context
    from slimtorch.core.errors import UserInputError
    from slimtorch.models.registry import load_model
    from slimtorch.search.sensitivity import scan, task_evaluator
    from slimtorch.search.sensitivity_table import most_sensitive, to_markdown, write_text_atomic

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserInputError(f"--out {out} is a file; give a directory")
    existing = [out / f for f in (JSON_FILE, MARKDOWN_FILE) if (out / f).exists()]
    if existing and not args.force:
        raise UserInputError(f"{existing[0]} exists; pass --force to replace it")
    layers = [n for item in args.layers for n in item.split(",") if n] if args.layers else None
    grid = {k: parse_values(getattr(args, k), f"--{k}") for k in ("prune", "bits", "codebook")}
    loaded = load_model(args.model)
    start = time.perf_counter()
    evaluate, metric, higher = task_evaluator(
        loaded, args.data, args.samples, split=args.split, ctx=Context(progress=False)
    )
    sens = scan(
        loaded.model,
        evaluate,
        higher_is_better=higher,
        layers=layers,
        progress=not args.quiet,
        metric=metric,
        model_name=args.model,
        prune=grid["prune"],
        bits=grid["bits"],
        codebook=grid["codebook"],
    )
    seconds = time.perf_counter() - start
    out.mkdir(parents=True, exist_ok=True)
    sens.save(out / JSON_FILE)
    write_text_atomic(out / MARKDOWN_FILE, to_markdown(sens))
    return {
        "model": args.model,
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
