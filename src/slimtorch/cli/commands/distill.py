"""``slimtorch distill``: train a (smaller) student towards a teacher, save it, measure both.

    slimtorch distill --teacher builtin:minilm --keep-layers 1,3,5 \\
        --data builtin:austen+builtin:wikipedia --steps 2000 --out minilm-l3
"""

from __future__ import annotations

import argparse
from typing import Any

from slimtorch.cli.options import add_trust, context
from slimtorch.core.errors import ConfigError


def _keep(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        return [int(i) for i in text.split(",")]
    except ValueError:
        raise ConfigError(
            f"--keep-layers {text!r} must be comma-separated layer indices, e.g. 0,2,4"
        ) from None


def add_parser(sub: Any) -> None:
    """Add the ``distill`` command to the ``slimtorch`` subparsers ``sub``."""
    p: argparse.ArgumentParser = sub.add_parser(
        "distill", help="train a (smaller) student towards a teacher and save the artifact"
    )
    p.add_argument("--teacher", required=True, help="builtin:NAME, a HF directory or an artifact")
    p.add_argument(
        "--student", help="builtin:NAME, a HF directory or an artifact (default: teacher)"
    )
    p.add_argument("--keep-layers", help="layers the student keeps, e.g. 0,2,4")
    p.add_argument(
        "--data",
        help="the teacher's task dataset, or text for sentence encoders"
        " (default builtin:austen+builtin:wikipedia; join specs with +)",
    )
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--alpha", type=float, default=0.5, help="weight of soft labels vs labels")
    p.add_argument("--hidden-loss", choices=["mse", "cosine", "none"], default="mse")
    p.add_argument("--out", required=True, help="output directory for the student artifact")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    add_trust(p, model=False)
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Handler of ``slimtorch distill``."""
    from slimtorch.workflows.distill import DistillJob, distill_options, distill_to_dir

    train, distill = distill_options(
        args.steps, args.lr, args.batch_size, args.temperature, args.alpha
    )
    job = DistillJob(
        teacher=args.teacher,
        out=args.out,
        student=args.student,
        keep_layers=_keep(args.keep_layers),
        data=args.data,
        train=train,
        distill=distill,
        hidden_loss=args.hidden_loss,
        force=args.force,
        trust_factory=args.trust_factory,
    )
    return distill_to_dir(job, context(args))


def render(r: dict[str, Any]) -> str:
    """Text report of :func:`run`'s result."""

    def fmt(v: Any) -> str:
        return "-" if v is None else f"{v:.4g}" if isinstance(v, float) else f"{v:,}"

    metric = r.get("metric") or "quality"
    rows = [
        (metric, r.get("teacher_value"), r.get("value")),
        ("params", r.get("teacher_params"), r.get("params")),
        ("latency ms", r.get("teacher_latency_ms"), r.get("latency_ms")),
    ]
    lines = [
        f"{r['teacher']} -> {r['out']} (layers {r.get('kept_layers') or 'all'}, {r['steps']} steps,"
        f" loss {r['loss_first']:.4g} -> {r['loss_last']:.4g})",
        f"student before distillation: {metric} {fmt(r.get('student_before_value'))}",
    ]
    lines += [f"{name:<12} teacher {fmt(a):>12}  student {fmt(b):>12}" for name, a, b in rows]
    lines.append(f"bytes on disk: {fmt(r.get('bytes_on_disk'))}")
    return "\n".join(lines)
