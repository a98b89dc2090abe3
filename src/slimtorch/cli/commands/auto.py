"""``slimtorch auto``: search per-layer compression under size, latency and quality budgets.

    slimtorch auto --model builtin:lenet5-fashion --data builtin:fashion-mnist \\
        --max-size 20x --max-drop 1.0 --out runs/lenet5
    slimtorch auto --model builtin:minilm --max-size 4x --max-drop 0.01 --workers 1 --out runs/minilm
    slimtorch auto --model builtin:lenet5-fashion --profile mcu --out runs/mcu
    slimtorch auto --model builtin:lenet5-fashion --max-size 20x --runner ray \\
        --ray-address auto --out /shared/runs/lenet5

Rerunning the same command resumes (finished trials are not repeated); ``--force`` starts over.
The best artifact meeting every budget is ``OUT/best`` (docs/auto.md describes every file).
"""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Add the ``auto`` subcommand to the ``sub`` subparsers of the main parser."""
    p: argparse.ArgumentParser = sub.add_parser(
        "auto", help="search per-layer pruning/quantization/sharing under budgets"
    )
    p.add_argument("--model", required=True, help="builtin:NAME or a local HF directory")
    p.add_argument("--data", help="training data for the short fine-tuning after pruning")
    p.add_argument("--max-size", help="size budget: 2MB, 500KB, 512KiB, or 20x (fp32 / 20)")
    p.add_argument("--max-latency-ms", type=float, help="latency budget measured here (ms)")
    p.add_argument("--max-drop", type=float, help="quality loss allowed, in the model's metric")
    p.add_argument("--out", required=True, help="search directory (trials, Pareto set, best/)")
    p.add_argument("--profile", help="mcu, phone, server, or a YAML file of budgets")
    p.add_argument("--workers", type=int, default=2, help="parallel trial processes")
    p.add_argument("--max-trials", type=int, default=24, help="trials in all, resumed included")
    p.add_argument("--time-budget", help="stop after this long: 600, 90s, 10m, 1h")
    p.add_argument(
        "--resume",
        action="store_true",
        default=None,
        help="continue the search in --out (the default when --out has trials.jsonl)",
    )
    p.add_argument("--force", action="store_true", help="discard a search in --out, start over")
    p.add_argument("--runtime", choices=["torch", "onnx"], default="torch")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--runner",
        choices=["local", "ray"],
        default="local",
        help="run trials as local processes or as Ray tasks (pip install 'slimtorch[ray]')",
    )
    p.add_argument(
        "--ray-address",
        help="Ray cluster to join: auto (a `ray start --head` here) or ray://host:10001;"
        " default: start a local Ray instance",
    )
    p.add_argument(
        "--ray-cpus-per-trial",
        type=float,
        help="CPUs each trial reserves (default: its torch threads, 1)",
    )
    p.add_argument("--ray-gpus-per-trial", type=float, default=0.0, help="GPUs each trial reserves")
    g = p.add_argument_group("per-tensor GGUF types for an LLM (--max-bpw or --to gguf)")
    g.add_argument("--max-bpw", help="bits per weight of the GGUF file's tensors, e.g. 4.9")
    g.add_argument("--to", choices=["gguf"], help="choose GGUF types per tensor (a file budget)")
    g.add_argument("--gguf-types", help="types to choose from (default Q4_0,Q5_0,Q8_0,Q4_K,...)")
    g.add_argument("--scan-samples", type=int, default=16, help="scan windows of text")
    g.add_argument("--scan-tokens", type=int, default=256, help="tokens per scan window")
    g.add_argument("--imatrix", help="llama-imatrix file weighting the rounding (default: own)")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    return p


def _run_bpw(args: argparse.Namespace) -> dict[str, Any]:
    from slimtorch.core.errors import UserInputError
    from slimtorch.workflows.auto import BpwJob, auto_bpw

    unused = [f for f in ("max_latency_ms", "max_drop", "profile") if getattr(args, f) is not None]
    if unused or args.runner != "local":
        names = ", ".join("--" + f.replace("_", "-") for f in unused) or "--runner ray"
        raise UserInputError(
            f"{names} does not apply to the GGUF type plan (--max-bpw / --to gguf): its budgets"
            " are --max-bpw and --max-size"
        )
    job = BpwJob(model=args.model, out=args.out, max_bpw=args.max_bpw, max_size=args.max_size,
                 data=args.data, types=args.gguf_types, samples=args.scan_samples,
                 tokens=args.scan_tokens, imatrix=args.imatrix, force=args.force,
                 seed=args.seed)  # fmt: skip
    return auto_bpw(job)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run ``slimtorch auto``; returns the report of OUT (auto.json plus Pareto rows)."""
    from slimtorch.workflows.auto import AutoJob, RaySettings, auto_to_dir

    if args.max_bpw is not None or args.to == "gguf":
        return _run_bpw(args)
    job = AutoJob(
        model=args.model,
        out=args.out,
        data=args.data,
        max_size=args.max_size,
        max_latency_ms=args.max_latency_ms,
        max_drop=args.max_drop,
        profile=args.profile,
        workers=args.workers,
        max_trials=args.max_trials,
        time_budget=args.time_budget,
        resume=args.resume,
        force=args.force,
        runtime=args.runtime,
        seed=args.seed,
        verbose=not args.json,
        runner=args.runner,
        ray=RaySettings(args.ray_address, args.ray_cpus_per_trial, args.ray_gpus_per_trial),
    )
    return auto_to_dir(job)


def _mb(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e6:.3f} MB"


def _or(value: Any) -> str:
    return "-" if value is None else str(value)


def _row(r: dict[str, Any]) -> str:
    lat = "-" if r["latency_ms"] is None else f"{r['latency_ms']:.3f}"
    drop = "-" if r["drop"] is None else f"{r['drop']:+.4g}"
    quality = "-" if r["quality"] is None else f"{r['quality']:.4g}"
    ratio = "-" if r["ratio"] is None else f"{r['ratio']:.1f}x"
    mark = "*" if r["meets_budget"] else " "
    return (
        f"{mark} {r['id']}  {_mb(r['bytes']):>12} {ratio:>7} {lat:>9} {quality:>8} {drop:>9}"
        f"  {r['label']}"
    )


def _render_bpw(result: dict[str, Any]) -> str:
    written = result["written"]
    counts = ", ".join(f"{k} {v}" for k, v in written["tensors"].items())
    scan = result["scan"]
    cached = "cached" if scan["fisher_cached"] else "computed"
    return "\n".join([
        f"{result['model']}: GGUF type plan, {result['bpw']:.4f} bits per weight"
        f" (budget {_or(result['budgets']['max_bpw'])}), predicted KLD"
        f" {result['predicted_kld']:.4g}",
        f"scan: Fisher {cached}, {scan['tensors_cached']} tensors cached,"
        f" {scan['scan_seconds']} s",
        f"wrote {written['out']}: {written['bytes']:,} bytes ({counts})",
    ])  # fmt: skip


def render(result: dict[str, Any]) -> str:
    """Plain-text summary of :func:`run`'s result."""
    if "written" in result:
        return _render_bpw(result)
    base, budgets = result["baseline"], result["budgets"]
    lines = [
        f"{result['model']}: {result['status']} after {result['trials']} trials"
        f" ({result['failed']} failed); out {result['out']}",
        f"baseline: {result['metric']} {base['quality']:.4g}, {_mb(base['bytes'])},"
        f" {base['latency_ms'] or 0:.3f} ms",
        f"budgets: size {_mb(budgets['max_bytes'])}, latency {_or(budgets['max_latency_ms'])} ms,"
        f" drop {_or(budgets['max_drop'])}",
        "",
        "  id                   bytes   ratio   lat ms  quality      drop  label",
        *[_row(r) for r in result["pareto"]],
        "(* meets every budget)",
        "",
    ]
    best, uni = result["best_trial"], result["best_uniform"]
    lines.append("best: " + (_row(best).strip() + f" -> {result['out']}/best" if best else "none"))
    lines.append("best uniform recipe in budget: " + (_row(uni).strip() if uni else "none"))
    if result["status"] == "interrupted":
        lines.append("interrupted: rerun the same command to resume")
    return "\n".join(lines)
