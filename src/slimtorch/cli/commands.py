"""Command handlers (argparse Namespace -> JSON-able dict) and their text rendering."""

from __future__ import annotations

import argparse
from typing import Any

from slimtorch import workflow
from slimtorch.core.context import Context


def _ctx(args: argparse.Namespace) -> Context:
    return Context(seed=args.seed, progress=not args.quiet and not args.json)


def compress(args: argparse.Namespace) -> dict[str, Any]:
    options = workflow.CompressOptions(
        data=args.data,
        force=args.force,
        latency_batch=args.latency_batch,
        input_shape=args.input_shape,
        input_dtype=args.input_dtype,
        max_memory=args.max_memory,
        work_dir=args.work_dir,
    )
    return workflow.compress_to_dir(args.model, args.recipe, args.out, options, _ctx(args))


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    return workflow.evaluate_dir(
        args.dir,
        args.data,
        _ctx(args),
        args.latency_batch,
        baseline=not args.no_baseline,
        width=args.width,
    )


def inspect(args: argparse.Namespace) -> dict[str, Any]:
    return workflow.inspect_dir(args.dir)


def recipes(args: argparse.Namespace) -> dict[str, Any]:
    return workflow.presets()


def demo(args: argparse.Namespace) -> dict[str, Any]:
    return workflow.demo(args.out, args.recipe, _ctx(args))


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def table(rows: list[list[Any]], header: list[str]) -> str:
    cells = [header] + [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _before_after(r: dict[str, Any]) -> str:
    metric = r.get("metric") or "quality"
    rows = [
        [metric, r.get("baseline_value"), r.get("value")],
        ["bytes on disk", r.get("dense_bytes"), r.get("bytes_on_disk")],
        ["compression ratio", 1.0, r.get("compression_ratio")],
        [
            f"latency ms (batch {r.get('latency_batch', 1)})",
            r.get("baseline_latency_ms"),
            r.get("latency_ms"),
        ],
        ["params", r.get("baseline_params"), r.get("params")],
        ["nonzero params", r.get("baseline_nonzero_params"), r.get("nonzero_params")],
    ]
    return table(rows, ["", "original (fp32)", "compressed"])


def render(command: str, r: dict[str, Any]) -> str:
    if command == "recipes":
        width = max(len(n) for n in r["presets"])
        return "\n".join(f"{n.ljust(width)}  {d}" for n, d in r["presets"].items())
    if command == "inspect":
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
            f" (fp32 safetensors {_fmt(r.get('dense_bytes'))}), recipe {r.get('recipe')}"
        )
        return (
            head
            + "\n"
            + table(
                rows,
                ["tensor", "shape", "sparsity", "bits/weight", "encoding", "codebook", "bytes"],
            )
        )
    lines = []
    if command == "demo":
        lines.append("slimtorch demo: builtin:lenet5-fashion, recipe " + str(r.get("recipe")))
        if r.get("note"):
            lines.append("note: " + r["note"])
    elif command == "compress":
        lines.append(f"{r['model']} -> {r['out']} (recipe {r['recipe']})")
    else:
        lines.append(f"artifact (source {r.get('source')})")
    lines.append(_before_after(r))
    return "\n".join(lines)
