"""``slimtorch methods``: every registered recipe method, its options and the layers it works on.

slimtorch methods                            # a text listing
slimtorch methods --json                     # the same, machine-readable
slimtorch methods --markdown > docs/methods.md
"""

from __future__ import annotations

import argparse
import json
from typing import Any


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Add the ``methods`` subcommand to the ``sub`` subparsers of the main parser."""
    p: argparse.ArgumentParser = sub.add_parser(
        "methods", help="list every recipe method with its options and the layers it works on"
    )
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="print machine-readable JSON")
    out.add_argument("--markdown", action="store_true", help="print docs/methods.md")
    return p


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The listing; with ``--markdown``, ``{"markdown": text}`` (what :func:`render` prints)."""
    from slimtorch.workflows.methods import list_methods, methods_markdown

    listing = list_methods()
    return {"markdown": methods_markdown(listing)} if args.markdown else listing


def _option(o: dict[str, Any]) -> str:
    default = " (required)" if o["required"] else f" = {json.dumps(o['default'])}"
    bounds = f"({', '.join(o['constraints'])})" if o["constraints"] else ""
    text = " ".join(t for t in (o["description"], bounds) if t)
    return f"    {o['name']}: {o['type']}{default}" + (f"  {text}" if text else "")


def render(result: dict[str, Any]) -> str:
    """The listing as text, or the Markdown document as is (without its final newline)."""
    if "markdown" in result:
        return str(result["markdown"]).removesuffix("\n")
    width = max((len(m["name"]) for m in result["methods"]), default=0)
    shared = ", ".join(o["name"] for o in result["common_options"])
    lines = [f"every method also takes: {shared} (which layers; see docs/methods.md)", ""]
    for m in result["methods"]:
        lines.append(f"{m['name'].ljust(width)}  {m['summary']}")
        flags = [f"applies to: {m['applies_to']}"]
        flags += ["needs --data"] if m["needs_data"] else []
        flags += ["layer-wise (--max-memory)"] if m["layerwise"] else []
        lines.append("    " + "; ".join(flags))
        lines += [_option(o) for o in m["options"]]
    return "\n".join(lines)
