"""The `slimtorch` command: a table of commands, each parsing its flags, calling one workflow
(``slimtorch.workflows``) and rendering the result (``slimtorch.cli.commands``).

Exit codes: 0 success, 2 bad user input (message, no traceback), 1 internal error (a failed
distributed run: 1 with one message, or 2 when a rank failed on bad input).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import traceback
from collections.abc import Sequence
from typing import Any, NoReturn, Protocol

from slimtorch.cli.commands import (
    auto,
    compress,
    demo,
    distill,
    evaluate,
    export,
    extract_lora,
    generate,
    inspect,
    merge,
    methods,
    moe,
    recipes,
    report,
    sensitivity,
    split,
)
from slimtorch.core.errors import UserInputError


class Command(Protocol):
    """A module of ``slimtorch.cli.commands``."""

    def add_parser(self, sub: Any) -> Any: ...

    def run(self, args: argparse.Namespace) -> dict[str, Any]: ...

    def render(self, result: dict[str, Any]) -> str: ...


COMMANDS: dict[str, Command] = {
    "compress": compress,
    "eval": evaluate,
    "inspect": inspect,
    "recipes": recipes,
    "demo": demo,
    "merge": merge,
    "extract-lora": extract_lora,
    "moe": moe,
    "distill": distill,
    "export": export,
    "generate": generate,
    "sensitivity": sensitivity,
    "report": report,
    "auto": auto,
    "methods": methods,
    "split": split,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="slimtorch",
        description="Make trained PyTorch models smaller and faster, and prove it.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS.values():
        command.add_parser(sub)
    return parser


def run() -> NoReturn:
    """The process entry of ``python -m slimtorch`` (and of every rank ``torchrun -m
    slimtorch`` starts): :func:`main`, then exit with its code."""
    from slimtorch.workflows.compress_distributed import end_process

    end_process(main())


def main(argv: Sequence[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(words)
    args.argv = words  # `compress --nproc N` starts torchrun with these words
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    command = COMMANDS[args.command]
    try:
        result = command.run(args)
    except UserInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return int(getattr(exc, "exit_code", 2))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception:  # internal error: show the traceback, exit 1
        traceback.print_exc()
        print("internal error: please report it with the command you ran", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2, default=str) if args.json else command.render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
