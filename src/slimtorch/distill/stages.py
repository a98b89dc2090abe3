"""The recipe stages of distill: ``distill.finetune``, ``distill.teacher``, ``distill.shrink``
and ``distill.data_free``.

    - method: distill.shrink           # MiniLM with 3 of its 6 layers
      keep: [1, 3, 5]
    - method: distill.finetune         # recover from the model as it was before the recipe
      sentences: builtin:austen+builtin:wikipedia
      distill:
        hidden:
          - {student: encoder.layer.2, teacher: encoder.layer.5}
      train: {steps: 2000, lr: 1.0e-4, batch_size: 32}

``distill.data_free`` recovers without data: a generator invents the inputs the student learns
the teacher on (:mod:`slimtorch.distill.data_free_task`).

``distill.teacher`` wraps the run's task so that every *later* training stage (``train.finetune``,
``quantize.qat``, ...) distils instead of training on labels alone.

The teacher is ``teacher:`` (``builtin:NAME``, a Hugging Face directory, or a slimtorch artifact
directory) or, when omitted, the model as it was before the recipe's first stage
(``run.original``, set by ``slimtorch.compress``).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from pydantic import Field, model_validator
from torch import nn

from slimtorch.artifact.load import load_artifact
from slimtorch.calibrate.inputs import require_inputs
from slimtorch.calibrate.sentences import DEFAULT_SENTENCES, SentenceTask, load_sentences
from slimtorch.calibrate.train import TrainOptions, seeded_rng, train
from slimtorch.core.config import StageConfig
from slimtorch.core.errors import ConfigError, UnsupportedModelError
from slimtorch.core.methods import Run, Task, register_method
from slimtorch.core.targets import Targets
from slimtorch.distill.data_free_task import DataFreeOptions, DataFreeTask, GeneratorOptions
from slimtorch.distill.generator import make_generator
from slimtorch.distill.student import shrink_layers
from slimtorch.distill.trainer import DistillOptions, DistillTask
from slimtorch.formats.artifact import MANIFEST_FILE
from slimtorch.models.registry import load_model

log = logging.getLogger(__name__)


def load_teacher(spec: str, trust_factory: bool = False) -> nn.Module:
    """``builtin:NAME``, a Hugging Face directory, ``pkg.mod:factory``, or an artifact directory
    (one of a ``pkg.mod:factory`` model loads only with ``trust_factory``)."""
    path = Path(spec)
    if (path / MANIFEST_FILE).is_file():
        return load_artifact(path, trust_factory=trust_factory)
    return load_model(spec).model


def resolve_teacher(
    spec: str | None, run: Run, student: nn.Module, method: str, trust_factory: bool = False
) -> nn.Module:
    """The teacher named by ``spec``, else ``run.original`` (the model before the recipe)."""
    if spec is None:
        original = getattr(run, "original", None)
        if original is None:
            raise ConfigError(
                f"{method} needs a teacher: set `teacher:` to builtin:NAME, a model directory or"
                " an artifact directory (slimtorch.compress passes the original model as teacher"
                " only where the run records it)"
            )
        teacher: nn.Module = original
    else:
        teacher = load_teacher(spec, trust_factory)
        param = next(student.parameters(), None)
        if param is not None:
            teacher = teacher.to(param.device)
    if teacher is student:
        raise ConfigError(f"{method}: the teacher is the student itself; give a separate teacher")
    return teacher


class _TeacherOptions(StageConfig):
    teacher: str | None = Field(
        default=None, description="builtin:NAME | model dir | artifact dir; None = the original"
    )
    trust_factory: bool = Field(
        default=False,
        description="a `teacher:` artifact of a package.module:factory model loads by importing"
        " and calling that factory (only for artifacts you trust)",
    )
    sentences: str | None = Field(
        default=None,
        description="text (builtin:austen, builtin:wikipedia, .txt, joined by '+') whose sentences"
        " train a text encoder; None = the run's task (--data), else for a text encoder"
        f" {DEFAULT_SENTENCES}",
    )
    tokenizer: str | None = Field(
        default=None, description="tokenizer.json (or its directory) for `sentences`; None = MiniLM"
    )
    distill: DistillOptions = Field(default_factory=DistillOptions)


class DistillFinetuneConfig(_TeacherOptions):
    """Train the model towards a teacher. ``targets``: the modules that train (None = all)."""

    train: TrainOptions = Field(default_factory=lambda: TrainOptions(steps=300, lr=1e-4))


class DistillTeacherConfig(_TeacherOptions):
    """Make every later training stage distil from the teacher (no training here)."""

    @model_validator(mode="after")
    def _no_targets(self) -> DistillTeacherConfig:
        if self.targets is not None or self.ignore:
            raise ValueError("distill.teacher trains nothing itself: drop `targets`/`ignore`")
        return self


class ShrinkConfig(StageConfig):
    """Keep only some of the model's layers (blocks of its largest uniform ModuleList)."""

    keep: list[int] = Field(min_length=1, description="indices of the layers to keep, increasing")
    layers: str | None = Field(default=None, description="module name of the layer list")

    @model_validator(mode="after")
    def _no_targets(self) -> ShrinkConfig:
        if self.targets is not None or self.ignore:
            raise ValueError(
                "distill.shrink selects layers with `keep` (and `layers`), not targets"
            )
        return self


def _is_text_encoder(model: nn.Module) -> bool:
    return isinstance(getattr(getattr(model, "config", None), "vocab_size", None), int)


def base_task(config: _TeacherOptions, run: Run, method: str, model: nn.Module) -> Task:
    """The task to distil on: sentences of ``config.sentences``, else the run's task (--data),
    else, for a text encoder (a model whose config has ``vocab_size``), sentences of
    ``DEFAULT_SENTENCES``."""
    if config.sentences is not None:
        return SentenceTask(load_sentences(config.sentences), config.tokenizer)
    if run.task is not None:
        return run.task
    if _is_text_encoder(model):
        log.info("%s: no --data, distilling on the sentences of %s", method, DEFAULT_SENTENCES)
        return SentenceTask(load_sentences(DEFAULT_SENTENCES), config.tokenizer)
    raise ConfigError(
        f"{method} needs data: pass --data (data= in Python), or set `sentences:` (e.g."
        f" {DEFAULT_SENTENCES}) to distil a text encoder on sentences"
    )


def _freeze_untargeted(model: nn.Module, config: StageConfig) -> list[nn.Parameter]:
    """Freeze parameters of modules outside ``targets``; returns what was frozen."""
    if config.targets is None and not config.ignore:
        return []
    sel = Targets.of(config.targets, config.ignore)
    chosen = {id(p) for n, m in model.named_modules() if sel.selects(n, m) for p in m.parameters()}
    if not chosen:
        raise sel.no_match_error(model)
    frozen = [p for p in model.parameters() if p.requires_grad and id(p) not in chosen]
    for p in frozen:
        p.requires_grad_(False)
    return frozen


def _distill_task(config: _TeacherOptions, run: Run, model: nn.Module, method: str) -> DistillTask:
    """The run's (or the config's) task, distilled from the configured or original teacher."""
    base = base_task(config, run, method, model)
    return DistillTask(
        resolve_teacher(config.teacher, run, model, method, config.trust_factory),
        base,
        config.distill,
    )


@register_method(
    "distill.finetune",
    DistillFinetuneConfig,
    "train towards a teacher (soft labels, hidden states, attention maps); masks stay",
)
def finetune(model: nn.Module, config: DistillFinetuneConfig, run: Run) -> None:
    task = _distill_task(config, run, model, "distill.finetune")
    frozen = _freeze_untargeted(model, config)
    try:
        losses = train(model, task, run.ctx, config.train)
    finally:
        for p in frozen:
            p.requires_grad_(True)
    log.info(
        "distill.finetune: %d steps, loss %.4f -> %.4f (%s)",
        len(losses),
        losses[0],
        losses[-1],
        ", ".join(f"{k} {v:.4f}" for k, v in task.last_terms.items()),
    )


@register_method(
    "distill.teacher",
    DistillTeacherConfig,
    "from here on, training stages (train.finetune, quantize.qat, ...) distil from a teacher",
)
def teacher_stage(model: nn.Module, config: DistillTeacherConfig, run: Run) -> None:
    dtask = _distill_task(config, run, model, "distill.teacher")
    run.task = dtask
    log.info("distill.teacher: later training stages distil (%s)", dtask.name)


@register_method(
    "distill.shrink",
    ShrinkConfig,
    "keep only some layers (a smaller student)",
    example={"keep": [0, 2]},
)
def shrink(model: nn.Module, config: ShrinkConfig, run: Run) -> None:
    shrink_layers(model, config.keep, config.layers)


class DataFreeConfig(StageConfig):
    """Recover towards a teacher on generated inputs: no data. ``targets``: what trains."""

    teacher: str | None = Field(
        default=None, description="builtin:NAME | model dir | artifact dir; None = the original"
    )
    trust_factory: bool = Field(
        default=False, description="a `teacher:` artifact of a package.module:factory model may run"
    )
    generator: GeneratorOptions = Field(default_factory=GeneratorOptions)
    data_free: DataFreeOptions = Field(default_factory=DataFreeOptions)
    train: TrainOptions = Field(default_factory=lambda: TrainOptions(steps=500, lr=1e-3))


def generated_shape(model: nn.Module, method: str) -> tuple[int, ...]:
    """The shape (without batch) of the one float input ``model`` takes, or a clear refusal."""
    try:
        inputs = require_inputs(model, method)
    except ConfigError:
        raise ConfigError(
            f"{method} generates inputs of the model's input shape and does not know it: load"
            " the model as builtin:NAME, or record its input with"
            " slimtorch.core.info.update_info(model, input={'shape': [1, C, H, W],"
            " 'dtype': 'float32'})"
        ) from None
    if len(inputs) != 1 or not isinstance(inputs[0], torch.Tensor):
        raise UnsupportedModelError(
            f"{method} generates one input tensor, but the model takes {len(inputs)} inputs;"
            " recover it with train.finetune or distill.finetune on --data"
        )
    if not inputs[0].is_floating_point():
        raise UnsupportedModelError(
            f"{method}: the model takes {inputs[0].dtype} inputs (token ids), so there is no"
            " continuous input to generate; recover it with distill.finetune on text"
            " (`sentences:`) or on --data"
        )
    return tuple(inputs[0].shape[1:])


@register_method(
    "distill.data_free",
    DataFreeConfig,
    "recover towards the teacher on generated inputs (DFAD/DAFL, BatchNorm prior): no data",
)
def data_free(model: nn.Module, config: DataFreeConfig, run: Run) -> None:
    method = "distill.data_free"
    shape = generated_shape(model, method)
    teacher = resolve_teacher(config.teacher, run, model, method, config.trust_factory)
    param = next(model.parameters(), None)
    with seeded_rng(run.ctx):
        gen = make_generator(shape, config.generator.latent, config.generator.width)
    if param is not None:
        gen = gen.to(param.device)
    task = DataFreeTask(teacher, model, gen, (config.generator, config.data_free))
    frozen = _freeze_untargeted(model, config)
    try:
        losses = train(model, task, run.ctx, config.train)
    finally:
        for p in frozen:
            p.requires_grad_(True)
    log.info(
        "%s: %d steps, disagreement %.4f -> %.4f (generator: %s)",
        method,
        len(losses),
        losses[0],
        losses[-1],
        ", ".join(f"{k} {v:.4f}" for k, v in task.last_terms.items()),
    )
