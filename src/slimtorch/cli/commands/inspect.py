"""``slimtorch inspect DIR``: per-tensor table of an artifact."""

from __future__ import annotations

import argparse
from typing import Any

from slimtorch.cli.options import add_common
from slimtorch.cli.render import fmt, table

HEADER = ["tensor", "shape", "sparsity", "bits/weight", "encoding", "codebook", "bytes"]


def add_parser(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser("inspect", help="per-layer table of an artifact")
    p.add_argument("dir")
    add_common(p)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from slimtorch.workflows.inspect import inspect_dir

    return inspect_dir(args.dir)


def render(r: dict[str, Any]) -> str:
    rows = [
        [
            x["name"],
            "x".join(map(str, x["shape"])),
            x["sparsity"],
            x["bits"],
            x["encoding"],
            x.get("codebook_size"),
            x["bytes"],
        ]
        for x in r["layers"]
    ]
    head = (
        f"{r['dir']}: {r['bytes_on_disk']:,} bytes on disk"
        f" (fp32 safetensors {fmt(r.get('dense_bytes'))}), recipe {r.get('recipe')}"
    )
    return head + "\n" + table(rows, HEADER)
