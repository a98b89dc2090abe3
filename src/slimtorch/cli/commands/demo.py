"""``slimtorch demo``: compress the bundled LeNet-5 and show before/after."""

from __future__ import annotations

import argparse
from typing import Any

from slimtorch.cli.options import add_common, context
from slimtorch.cli.render import before_after


def add_parser(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "demo", help="compress the bundled LeNet-5 and show before/after"
    )
    p.add_argument("--out", help="keep the artifact here (default: a temporary directory)")
    p.add_argument("--recipe", default="sparse90-int8")
    add_common(p)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from slimtorch.workflows.demo import demo

    return demo(args.out, args.recipe, context(args))


def render(r: dict[str, Any]) -> str:
    lines = ["slimtorch demo: builtin:lenet5-fashion, recipe " + str(r.get("recipe"))]
    if r.get("note"):
        lines.append("note: " + r["note"])
    lines.append(before_after(r))
    return "\n".join(lines)
