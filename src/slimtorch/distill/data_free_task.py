"""Data-free distillation as a Task of the project's one training loop.

:class:`DataFreeTask` invents its own batches: before each batch it yields, it updates a generator
(:mod:`slimtorch.distill.generator`) to produce inputs on which the student and the teacher
disagree (DFAD), pulled towards what the teacher has seen by priors that need no data: its
BatchNorm running statistics (DeepInversion), a balanced spread over its classes and confident
teacher predictions (DAFL). The batch it yields is a fresh sample of the updated generator; its
loss is the student's disagreement with the teacher there, so
``calibrate.train.train(student, task, ...)`` trains the student as every other stage does
(pruned weights stay zero, quantized weights stay frozen, the run's seed).

Only the generator's parameters receive the generator step's gradients
(``torch.autograd.grad``): the student and the teacher are untouched by it. The teacher always
runs in eval mode; the student runs in eval mode for the generator step and, for its own step,
in train mode unless ``freeze_bn`` (then its BatchNorm statistics stay those of the real data).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch
from pydantic import Field
from torch import nn

from slimtorch.core.config import StrictModel
from slimtorch.core.context import Context
from slimtorch.distill import data_free as df
from slimtorch.distill.trainer import eval_mode, first_tensor

log = logging.getLogger(__name__)


class GeneratorOptions(StrictModel):
    """The generator and what it is trained towards."""

    latent: int = Field(default=64, ge=1, description="size of the noise vector")
    width: int = Field(default=64, ge=2, description="channels of its first feature map")
    lr: float = Field(default=1e-3, gt=0)
    warmup: int = Field(
        default=50,
        ge=0,
        description="generator steps on the priors alone before the student trains",
    )
    every: int = Field(
        default=1, ge=1, description="one generator step every `every` student steps"
    )
    adversarial: float = Field(
        default=1.0, ge=0, description="weight of the student-teacher disagreement it maximises"
    )
    bn_prior: float = Field(
        default=1.0, ge=0, description="weight of the teacher's BatchNorm statistics (if any)"
    )
    balance: float = Field(default=1.0, ge=0, description="weight of the class-balance term")
    confidence: float = Field(default=0.1, ge=0, description="weight of the one-hot term")


class DataFreeOptions(StrictModel):
    """What the student minimises on the generated inputs."""

    disagreement: df.Disagreement = Field(
        default="kl", description="kl (softmax) or l1 on logits (DFAD)"
    )
    freeze_bn: bool = Field(
        default=False, description="keep the student's BatchNorm running statistics unchanged"
    )


class DataFreeTask:
    """Generated batches and the student-teacher disagreement on them (see module doc)."""

    name = "data-free"
    has_labels = False

    def __init__(
        self,
        teacher: nn.Module,
        student: nn.Module,
        generator: nn.Module,
        options: tuple[GeneratorOptions, DataFreeOptions],
    ) -> None:
        self.teacher, self.student, self.generator = teacher, student, generator
        self.gen_options, self.options = options
        self.prior = df.BNPrior()
        self.use_prior = self.gen_options.bn_prior > 0 and df.has_bn_statistics(teacher)
        params = list(generator.parameters())
        self.optimizer = torch.optim.Adam(params, lr=self.gen_options.lr, betas=(0.5, 0.999))
        self.last_terms: dict[str, float] = {}

    def _device(self) -> torch.device:
        param = next(self.generator.parameters())
        return param.device

    def _noise(self, batch_size: int) -> torch.Tensor:
        return torch.randn(batch_size, self.gen_options.latent, device=self._device())

    def generator_loss(self, x: torch.Tensor, adversarial: bool) -> torch.Tensor:
        """The generator's loss on its inputs ``x``: priors minus the weighted disagreement."""
        g = self.gen_options
        with eval_mode(self.teacher), self.prior.attach(self.teacher):
            t = first_tensor(self.teacher(x))
        terms = {"balance": g.balance * df.class_balance_loss(t)}
        terms["confidence"] = g.confidence * df.confidence_loss(t)
        if self.use_prior:
            terms["bn_prior"] = g.bn_prior * self.prior.loss().to(t.device)
        if adversarial and g.adversarial > 0:
            with eval_mode(self.student):
                s = first_tensor(self.student(x))
            kind = self.options.disagreement
            terms["disagreement"] = -g.adversarial * df.disagreement(s, t, kind)
        self.last_terms = {k: float(v.detach()) for k, v in terms.items()}
        total: torch.Tensor = sum(terms.values())  # type: ignore[assignment]
        return total

    def generator_step(self, batch_size: int, adversarial: bool = True) -> float:
        """One Adam step of the generator (only its parameters get gradients)."""
        self.generator.train()
        loss = self.generator_loss(self.generator(self._noise(batch_size)), adversarial)
        params = [p for p in self.generator.parameters() if p.requires_grad]
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        for p, grad in zip(params, grads, strict=True):
            p.grad = grad
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    @torch.no_grad()
    def sample(self, batch_size: int) -> torch.Tensor:
        """A batch of generated inputs (the generator's BatchNorm uses the batch's statistics)."""
        self.generator.train()
        return self.generator(self._noise(batch_size))  # type: ignore[no-any-return]

    def train_batches(self, ctx: Context, steps: int, batch_size: int) -> Iterator[torch.Tensor]:
        batch_size = max(batch_size, 2)  # the generator's BatchNorm needs two samples
        for _ in range(self.gen_options.warmup):
            self.generator_step(batch_size, adversarial=False)
        for step in range(steps):
            if step % self.gen_options.every == 0:
                self.generator_step(batch_size)
            yield self.sample(batch_size)

    def forward(self, model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        return first_tensor(model(batch))

    def loss(self, model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        """The student's disagreement with the teacher on a generated ``batch``."""
        with torch.no_grad(), eval_mode(self.teacher):
            t = first_tensor(self.teacher(batch))
        mode = eval_mode(model) if self.options.freeze_bn else contextlib.nullcontext()
        with mode:
            s = first_tensor(model(batch))
        return df.disagreement(s, t, self.options.disagreement)
