"""``slimtorch distill``: train a (smaller) student towards a teacher, save it, measure both.

    slimtorch distill --teacher builtin:minilm --keep-layers 1,3,5 \\
        --data builtin:austen+builtin:wikipedia --steps 2000 --out minilm-l3

The student is ``--student`` (default: a fresh copy of the teacher), optionally cut to
``--keep-layers``; with kept layers, student layer i also matches the hidden states of teacher
layer ``keep[i]``. Data: the dataset of the teacher's task (builtin models with a task), else
text whose sentences train a sentence encoder.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from slimtorch.core.errors import ConfigError

if TYPE_CHECKING:  # the heavy imports wait until the command runs (`slimtorch --help` stays fast)
    from torch import nn

    from slimtorch.calibrate.train import TrainOptions
    from slimtorch.core.context import Context
    from slimtorch.core.methods import Task
    from slimtorch.distill.trainer import DistillOptions, HiddenPair


@dataclass
class DistillJob:
    """What ``slimtorch distill`` does (see :func:`distill_to_dir`)."""

    teacher: str
    out: str
    student: str | None = None
    keep_layers: list[int] | None = None
    data: str | None = None
    train: TrainOptions | None = None
    distill: DistillOptions | None = None
    hidden_loss: str = "mse"  # "mse" | "cosine" | "none": layer matching after --keep-layers
    force: bool = False


def _load(spec: str) -> tuple[nn.Module, str | None]:
    """A model with its architecture and metadata recorded, and the name of its task."""
    from slimtorch import api
    from slimtorch.formats.artifact import MANIFEST_FILE
    from slimtorch.models.registry import builtin_info, load_model

    if (Path(spec) / MANIFEST_FILE).is_file():
        model = api.load(spec)
        source = str(api.get_metadata(model).get("source") or "")
        if source.startswith("builtin:"):
            return model, builtin_info(source.split(":", 1)[1]).task
        return model, None
    loaded = load_model(spec)
    api.set_architecture(loaded.model, loaded.architecture)
    api.get_metadata(loaded.model).update(
        {"source": spec, "evaluator": loaded.evaluator, "data": loaded.data}
    )
    return loaded.model, loaded.task


def _task(teacher: nn.Module, job: DistillJob, task_name: str | None) -> Task:
    from slimtorch.calibrate.sentences import DEFAULT_SENTENCES, SentenceTask, load_sentences
    from slimtorch.calibrate.tasks import make_task

    if task_name is not None:
        return make_task(task_name, job.data)
    if getattr(getattr(teacher, "config", None), "vocab_size", None) is None:
        raise ConfigError(
            f"no training task is known for {job.teacher}: give a builtin model with a task"
            " (e.g. builtin:lenet5-fashion) or a Hugging Face text encoder"
        )
    return SentenceTask(load_sentences(job.data or DEFAULT_SENTENCES))


def _pairs(teacher: nn.Module, job: DistillJob) -> list[HiddenPair]:
    from slimtorch.distill.student import find_layer_list, layer_pairs

    if not job.keep_layers or job.hidden_loss == "none":
        return []
    name, _ = find_layer_list(teacher)
    return layer_pairs(name, job.keep_layers, job.hidden_loss)


def _value(model: nn.Module, ctx: Context) -> dict[str, Any]:
    from slimtorch import api

    return api.evaluate(model, ctx=ctx)


def distill_to_dir(job: DistillJob, ctx: Context | None = None) -> dict[str, Any]:
    """Load teacher and student, shrink, distil, save to ``job.out``, reload and measure."""
    from slimtorch import api
    from slimtorch.calibrate.train import TrainOptions, train
    from slimtorch.core.context import Context
    from slimtorch.distill.student import shrink_layers
    from slimtorch.distill.trainer import DistillOptions, DistillTask

    ctx = ctx or Context()
    out = Path(job.out)
    if out.exists() and not job.force:
        raise ConfigError(f"output directory {out} exists; pass --force to replace it")
    teacher, task_name = _load(job.teacher)
    student, _ = _load(job.student or job.teacher)
    if job.keep_layers:
        shrink_layers(student, job.keep_layers)
    options = (job.distill or DistillOptions()).model_copy()
    options.hidden = [*options.hidden, *_pairs(teacher, job)]
    task = DistillTask(teacher, _task(teacher, job, task_name), options)
    teacher_eval = _value(teacher, ctx)
    before = _value(student, ctx)
    losses = train(student, task, ctx, job.train or TrainOptions(lr=1e-4, batch_size=32))
    api.get_metadata(student).update(
        {"distilled_from": job.teacher, "kept_layers": job.keep_layers}
    )
    api.save(student, out, force=job.force)
    measured = _value(api.load(out), ctx)
    return {
        "teacher": job.teacher,
        "student": job.student or job.teacher,
        "kept_layers": job.keep_layers,
        "out": str(out),
        "steps": len(losses),
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "loss_terms": task.last_terms,
        "metric": measured.get("metric"),
        "teacher_value": teacher_eval.get("value"),
        "student_before_value": before.get("value"),
        "value": measured.get("value"),
        "teacher_params": teacher_eval.get("params"),
        "params": measured.get("params"),
        "nonzero_params": measured.get("nonzero_params"),
        "teacher_latency_ms": teacher_eval.get("latency_ms"),
        "latency_ms": measured.get("latency_ms"),
        "bytes_on_disk": api.artifact_size(out),
    }


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
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Handler of ``slimtorch distill``."""
    from slimtorch.calibrate.train import TrainOptions
    from slimtorch.core.context import Context
    from slimtorch.distill.trainer import DistillOptions

    try:
        train_opts = TrainOptions(steps=args.steps, lr=args.lr, batch_size=args.batch_size)
        distill_opts = DistillOptions(temperature=args.temperature, alpha=args.alpha)
    except ValueError as exc:  # pydantic's ValidationError
        raise ConfigError(f"bad distill option: {exc}") from None
    job = DistillJob(
        teacher=args.teacher,
        out=args.out,
        student=args.student,
        keep_layers=_keep(args.keep_layers),
        data=args.data,
        train=train_opts,
        distill=distill_opts,
        hidden_loss=args.hidden_loss,
        force=args.force,
    )
    ctx = Context(seed=args.seed, progress=not args.quiet and not args.json)
    return distill_to_dir(job, ctx)


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
