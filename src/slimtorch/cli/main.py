"""The `slimtorch` command: a thin layer over slimtorch.api. Logic here is a bug.

Exit codes: 0 success, 2 bad user input (message, no traceback), 1 internal error.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any

from slimtorch.cli import (
    cmd_auto,
    cmd_distill,
    cmd_export,
    cmd_merge,
    cmd_report,
    cmd_sensitivity,
)
from slimtorch.core.errors import UserInputError


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="slimtorch",
        description="Make trained PyTorch models smaller and faster, and prove it.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("compress", help="compress a model with a recipe and save the artifact")
    p.add_argument(
        "--model", required=True, help="builtin:NAME, a local HF directory, or pkg.mod:factory"
    )
    p.add_argument(
        "--recipe", required=True, help="a preset name (see `slimtorch recipes`) or a YAML file"
    )
    p.add_argument(
        "--data", help="builtin:NAME or a path: training/calibration and evaluation data"
    )
    p.add_argument("--out", required=True, help="output directory for the artifact")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.add_argument("--latency-batch", type=int, default=1)
    p.add_argument(
        "--input-shape",
        help="input shape for latency runs of models slimtorch does"
        " not know, e.g. 1,3,224,224 (recorded in the artifact)",
    )
    p.add_argument("--input-dtype", default="float32", choices=["float32", "int64"])
    p.add_argument(
        "--max-memory",
        help="memory budget, e.g. 1GB: a Hugging Face checkpoint bigger than half of it is"
        " compressed block by block (layer-wise stages only), resumable",
    )
    p.add_argument(
        "--work-dir", help="progress of an offloaded run (default: beside --out); rerun to resume"
    )
    _add_common(p)

    p = sub.add_parser(
        "eval", help="measure an artifact: size, latency, quality, against the original"
    )
    p.add_argument("dir")
    p.add_argument("--data", help="evaluation data (default: what the artifact records)")
    p.add_argument("--latency-batch", type=int, default=1)
    p.add_argument("--no-baseline", action="store_true", help="skip measuring the original model")
    p.add_argument(
        "--width",
        type=float,
        help="serve a prune.reorder-ed artifact on this fraction of its channels, e.g. 0.5",
    )
    _add_common(p)

    p = sub.add_parser("inspect", help="per-layer table of an artifact")
    p.add_argument("dir")
    _add_common(p)

    p = sub.add_parser("recipes", help="list the shipped presets")
    _add_common(p)

    p = sub.add_parser("demo", help="compress the bundled LeNet-5 and show before/after")
    p.add_argument("--out", help="keep the artifact here (default: a temporary directory)")
    p.add_argument("--recipe", default="sparse90-int8")
    _add_common(p)

    cmd_merge.add_parser(sub)
    cmd_distill.add_parser(sub)
    cmd_export.add_parser(sub)
    cmd_sensitivity.add_parser(sub)
    cmd_report.add_parser(sub)
    cmd_auto.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from slimtorch.cli import commands

    handlers: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {
        "compress": commands.compress,
        "eval": commands.evaluate,
        "inspect": commands.inspect,
        "recipes": commands.recipes,
        "demo": commands.demo,
        "merge": cmd_merge.run,
        "distill": cmd_distill.run,
        "export": cmd_export.run,
        "sensitivity": cmd_sensitivity.run,
        "report": cmd_report.run,
        "auto": cmd_auto.run,
    }
    renderers: dict[str, Callable[[dict[str, Any]], str]] = {
        "merge": cmd_merge.render,
        "distill": cmd_distill.render,
        "export": cmd_export.render,
        "sensitivity": cmd_sensitivity.render,
        "report": cmd_report.render,
        "auto": cmd_auto.render,
    }
    try:
        result = handlers[args.command](args)
    except UserInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception:  # internal error: show the traceback, exit 1
        traceback.print_exc()
        print("internal error: please report it with the command you ran", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    else:
        render = renderers.get(args.command)
        print(render(result) if render else commands.render(args.command, result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
