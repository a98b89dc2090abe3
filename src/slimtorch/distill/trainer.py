"""Distillation through the project's one training loop (``slimtorch.calibrate.train.train``).

:class:`DistillTask` wraps a task (``core.methods.Task``) and a teacher: its loss runs the teacher
on the same batch (eval mode, no grad) and combines the student's own task loss with the
distillation losses of :mod:`slimtorch.distill.losses`::

    loss = (1 - alpha) * task loss + alpha * output loss         (tasks with labels)
    loss =                               output loss             (tasks without labels)
         + sum(weight * hidden-state loss) + sum(weight * attention-map loss)

Because it is a Task, every stage that calls ``train()`` can distil (pruning masks stay, quantized
weights stay frozen: the loop enforces both). Nothing stays attached to the models between
steps: forward hooks for feature pairs are registered around each forward pass and removed after
it. Learned projections (student width != teacher width) live in the task and are updated by
their own Adam optimizer at the start of the next step.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from slimtorch.core.config import StrictModel
from slimtorch.core.context import Context
from slimtorch.core.errors import ConfigError
from slimtorch.core.methods import Task
from slimtorch.core.registry import nearest
from slimtorch.distill import losses

log = logging.getLogger(__name__)


class FeaturePair(StrictModel):
    """A student module whose output is pulled towards a teacher module's output."""

    student: str = Field(description="module name in the student ('' = the whole model)")
    teacher: str = Field(description="module name in the teacher")
    weight: float = Field(default=1.0, ge=0)


class HiddenPair(FeaturePair):
    """Hidden-state matching (first tensor of each module's output), projected if widths differ."""

    loss: Literal["mse", "cosine"] = "mse"


class AttentionPair(FeaturePair):
    """Attention transfer: the probability maps an attention module returns second.

    Hugging Face self-attention modules return them with eager attention (switched on for the
    step); ``nn.MultiheadAttention`` only when called with ``need_weights=True``.
    """

    loss: Literal["kl", "mse"] = "kl"
    heads: Literal["average", "match"] = "average"


class DistillOptions(StrictModel):
    """What the student learns from the teacher."""

    temperature: float = Field(default=2.0, gt=0, le=100)
    alpha: float = Field(
        default=0.5, ge=0, le=1, description="weight of the output loss vs the task's own loss"
    )
    output_loss: Literal["auto", "kl", "mse", "cosine", "none"] = Field(
        default="auto", description="auto: kl on logits, cosine on embeddings"
    )
    hidden: list[HiddenPair] = Field(default_factory=list)
    attention: list[AttentionPair] = Field(default_factory=list)
    projection_lr: float = Field(default=1e-3, gt=0)


def first_tensor(out: Any) -> torch.Tensor:
    """The main tensor of a module output: itself, ``logits``, ``last_hidden_state``, or item 0."""
    if isinstance(out, torch.Tensor):
        return out
    for attr in ("logits", "last_hidden_state"):
        value = getattr(out, attr, None)
        if isinstance(value, torch.Tensor):
            return value
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise ConfigError(
        f"cannot find a tensor in a module output of type {type(out).__name__}; pair modules"
        " that return a tensor (or a tuple starting with one)"
    )


def _attention_probs(out: Any, name: str) -> torch.Tensor:
    probs = out[1] if isinstance(out, (tuple, list)) and len(out) > 1 else None
    if not isinstance(probs, torch.Tensor):
        raise ConfigError(
            f"module {name!r} returned no attention probabilities: point `attention` pairs at"
            " attention modules that return (output, probs), e.g. a Hugging Face"
            " '...attention.self', or nn.MultiheadAttention called with need_weights=True"
        )
    return probs


def get_module(model: nn.Module, name: str, role: str) -> nn.Module:
    """``model.get_submodule(name)``, or a ConfigError naming the closest module name."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        names = [n for n, _ in model.named_modules() if n]
        hint = nearest(name, names)
        raise ConfigError(
            f"the {role} has no module {name!r}"
            + (f"; did you mean {hint!r}?" if hint else "")
            + f" ({len(names)} modules, e.g. {', '.join(names[:6])})"
        ) from None


@contextlib.contextmanager
def capture(
    model: nn.Module, wanted: dict[str, str], role: str
) -> Iterator[dict[str, torch.Tensor]]:
    """Record, during the block, the output of each module in ``wanted`` (key -> module name).

    Keys starting with ``attn:`` record attention probabilities, others the first tensor.
    """
    found: dict[str, torch.Tensor] = {}
    handles = []

    def hook_for(key: str, name: str) -> Any:
        def hook(_m: nn.Module, _inp: Any, out: Any) -> None:
            attn = key.startswith("attn:")
            found[key] = _attention_probs(out, name) if attn else first_tensor(out)

        return hook

    try:
        for key, name in wanted.items():
            handles.append(get_module(model, name, role).register_forward_hook(hook_for(key, name)))
        yield found
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def eager_attention(model: nn.Module, needed: bool) -> Iterator[None]:
    """Switch a Hugging Face model to eager attention (which returns its probabilities)."""
    config = getattr(model, "config", None)
    before = getattr(config, "_attn_implementation", None)
    switch = needed and before not in (None, "eager") and hasattr(model, "set_attn_implementation")
    if switch:
        model.set_attn_implementation("eager")  # type: ignore[operator]
    try:
        yield
    finally:
        if switch:
            model.set_attn_implementation(before)  # type: ignore[operator]


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


class DistillTask:
    """A Task whose loss distils ``teacher`` into the model being trained (see module doc)."""

    def __init__(self, teacher: nn.Module, base_task: Task, options: DistillOptions) -> None:
        self.teacher = teacher
        self.base = base_task
        self.options = options
        self.name = f"distill:{base_task.name}"
        self.has_labels = bool(getattr(base_task, "has_labels", True))
        kind = str(getattr(base_task, "output_kind", "logits"))
        auto = "kl" if kind == "logits" else "cosine"
        self.output_loss = auto if options.output_loss == "auto" else options.output_loss
        uses_labels = self.has_labels and options.alpha < 1.0
        if self.output_loss == "none" and not (uses_labels or options.hidden or options.attention):
            raise ConfigError(
                f"nothing to learn from: output_loss is 'none', there are no `hidden` or"
                f" `attention` pairs, and task {base_task.name!r} gives no label loss (it has no"
                " labels, or alpha is 1); set output_loss, add pairs, or lower alpha"
            )
        self.projections = nn.ModuleDict()
        self._proj_opt: torch.optim.Optimizer | None = None
        self.last_terms: dict[str, float] = {}

    def train_batches(self, ctx: Context, steps: int, batch_size: int) -> Any:
        return self.base.train_batches(ctx, steps, batch_size)

    def forward(self, model: nn.Module, batch: Any) -> Any:
        return self.base.forward(model, batch)

    def _wanted(self, side: Literal["student", "teacher"]) -> dict[str, str]:
        wanted = {f"hid:{i}": getattr(p, side) for i, p in enumerate(self.options.hidden)}
        wanted.update({f"attn:{i}": getattr(p, side) for i, p in enumerate(self.options.attention)})
        return wanted

    def _run(self, model: nn.Module, batch: Any, side: Literal["student", "teacher"]) -> Any:
        needs_attn = bool(self.options.attention)
        with eager_attention(model, needs_attn), capture(model, self._wanted(side), side) as feats:
            out = self.base.forward(model, batch)
        return out, feats

    def _teacher_pass(self, batch: Any, student: nn.Module) -> Any:
        if self.teacher is student:
            raise ConfigError("the teacher is the student itself; give a separate teacher model")
        with torch.no_grad(), eval_mode(self.teacher):
            return self._run(self.teacher, batch, "teacher")

    def _projection(self, index: int, s: torch.Tensor, t: torch.Tensor) -> nn.Module | None:
        key = str(index)
        if key not in self.projections:
            proj = losses.make_projection(s.shape[-1], t.shape[-1])
            if proj is None:
                return None
            self.projections[key] = proj.to(s.device)
            params = list(self.projections.parameters())
            self._proj_opt = torch.optim.Adam(params, lr=self.options.projection_lr)
            log.info(
                "distill: learned projection %d -> %d for pair %d", *proj.weight.shape[::-1], index
            )
        return self.projections[key]

    def _step_projections(self) -> None:
        """Apply the projections' gradients from the previous backward pass."""
        if self._proj_opt is not None:
            self._proj_opt.step()
            self._proj_opt.zero_grad(set_to_none=True)

    def _hard_loss(self, model: nn.Module, batch: Any, output: Any) -> torch.Tensor:
        from_output = getattr(self.base, "loss_from_output", None)
        if callable(from_output):
            return from_output(output, batch)  # type: ignore[no-any-return]
        return self.base.loss(model, batch)  # type: ignore[no-any-return]

    def _output_term(self, s_out: Any, t_out: Any) -> torch.Tensor:
        s, t = first_tensor(s_out), first_tensor(t_out).detach()
        if self.output_loss == "kl":
            return losses.soft_target_loss(s, t, self.options.temperature)
        return losses.embedding_loss(s, t, self.output_loss)  # type: ignore[arg-type]

    def _feature_terms(
        self, s_feats: dict[str, torch.Tensor], t_feats: dict[str, torch.Tensor], batch: Any
    ) -> dict[str, torch.Tensor]:
        token_mask = getattr(self.base, "token_mask", None)
        mask = token_mask(batch) if callable(token_mask) else None
        terms: dict[str, torch.Tensor] = {}
        for i, hp in enumerate(self.options.hidden):
            s, t = s_feats[f"hid:{i}"], t_feats[f"hid:{i}"]
            proj = self._projection(i, s, t)
            terms[f"hidden.{hp.student}"] = hp.weight * losses.hidden_state_loss(
                s, t, hp.loss, proj, mask if s.dim() == 3 else None
            )
        for i, ap in enumerate(self.options.attention):
            s, t = s_feats[f"attn:{i}"], t_feats[f"attn:{i}"]
            terms[f"attention.{ap.student}"] = ap.weight * losses.attention_map_loss(
                s, t, ap.loss, ap.heads, mask
            )
        return terms

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """The combined distillation loss of ``model`` on ``batch`` (one student forward pass)."""
        self._step_projections()
        t_out, t_feats = self._teacher_pass(batch, model)
        s_out, s_feats = self._run(model, batch, "student")
        terms: dict[str, torch.Tensor] = {}
        alpha = self.options.alpha if self.has_labels else 1.0
        if self.has_labels and alpha < 1.0:
            terms["task"] = (1.0 - alpha) * self._hard_loss(model, batch, s_out)
        if self.output_loss != "none" and alpha > 0.0:
            terms["output"] = alpha * self._output_term(s_out, t_out)
        terms.update(self._feature_terms(s_feats, t_feats, batch))
        self.last_terms = {k: float(v.detach()) for k, v in terms.items()}
        total: torch.Tensor = sum(terms.values())  # type: ignore[assignment]
        return total
