"""Train a (smaller) student towards a teacher, save it, measure both (``slimtorch distill``).

The student is ``job.student`` (default: a fresh copy of the teacher), optionally cut to
``job.keep_layers``; with kept layers, student layer i also matches the hidden states of
teacher layer ``keep[i]``. Data: the dataset of the teacher's task (builtin models with a
task), else text whose sentences train a sentence encoder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from slimtorch import api
from slimtorch.calibrate.train import TrainOptions, train
from slimtorch.core.context import Context
from slimtorch.core.errors import ConfigError
from slimtorch.core.info import model_info, update_info
from slimtorch.core.methods import Task
from slimtorch.distill.trainer import DistillOptions, DistillTask, HiddenPair


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
    trust_factory: bool = False  # artifacts of a Python factory may run it (trusted files only)


def distill_options(
    steps: int, lr: float, batch_size: int, temperature: float, alpha: float
) -> tuple[TrainOptions, DistillOptions]:
    """The training and distillation options, validated; a ConfigError names a bad one."""
    try:
        train_opts = TrainOptions(steps=steps, lr=lr, batch_size=batch_size)
        distill_opts = DistillOptions(temperature=temperature, alpha=alpha)
    except ValueError as exc:  # pydantic's ValidationError
        raise ConfigError(f"bad distill option: {exc}") from None
    return train_opts, distill_opts


def _load(spec: str, trust_factory: bool) -> tuple[nn.Module, str | None]:
    """A model with its architecture and metadata recorded, and the name of its task (an
    artifact of a Python factory loads only with ``trust_factory``)."""
    from slimtorch.formats.artifact import MANIFEST_FILE
    from slimtorch.models.registry import builtin_info, load_model

    if (Path(spec) / MANIFEST_FILE).is_file():
        model = api.load(spec, trust_factory=trust_factory)
        source = model_info(model).source or ""
        if source.startswith("builtin:"):
            return model, builtin_info(source.split(":", 1)[1]).task
        return model, None
    loaded = load_model(spec)
    update_info(
        loaded.model,
        architecture=loaded.architecture,
        source=spec,
        evaluator=loaded.evaluator,
        data=loaded.data,
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


def distill_to_dir(job: DistillJob, ctx: Context | None = None) -> dict[str, Any]:
    """Load teacher and student, shrink, distil, save to ``job.out``, reload and measure."""
    from slimtorch.distill.student import shrink_layers

    ctx = ctx or Context()
    out = Path(job.out)
    if out.exists() and not job.force:
        raise ConfigError(f"output directory {out} exists; pass --force to replace it")
    teacher, task_name = _load(job.teacher, job.trust_factory)
    student, _ = _load(job.student or job.teacher, job.trust_factory)
    if job.keep_layers:
        shrink_layers(student, job.keep_layers)
    options = (job.distill or DistillOptions()).model_copy()
    options.hidden = [*options.hidden, *_pairs(teacher, job)]
    task = DistillTask(teacher, _task(teacher, job, task_name), options)
    teacher_eval = api.evaluate(teacher, ctx=ctx)
    before = api.evaluate(student, ctx=ctx)
    losses = train(student, task, ctx, job.train or TrainOptions(lr=1e-4, batch_size=32))
    update_info(student, distilled_from=job.teacher, kept_layers=job.keep_layers)
    api.save(student, out, force=job.force)
    measured = api.evaluate(api.load(out), ctx=ctx)
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
