"""``slimtorch recipes``: the shipped presets."""

from __future__ import annotations

import argparse
from typing import Any

from slimtorch.cli.options import add_common


def add_parser(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser("recipes", help="list the shipped presets")
    add_common(p)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from slimtorch.workflows.recipes import presets

    return presets()


def render(r: dict[str, Any]) -> str:
    width = max(len(n) for n in r["presets"])
    return "\n".join(f"{n.ljust(width)}  {d}" for n, d in r["presets"].items())
