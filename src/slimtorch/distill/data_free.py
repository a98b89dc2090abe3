"""Data-free distillation maths: the losses of a generator that invents inputs, and the hooks that
read a teacher's BatchNorm statistics. Pure functions over tensors, apart from :class:`BNPrior`.

* :func:`disagreement` — DFAD (Fang et al. 2019): the mean absolute difference between the
  student's and the teacher's logits (``l1``), or the KL divergence of the student's softmax from
  the teacher's (``kl``). The generator maximises it, the student minimises it.
* :func:`bn_prior_loss` — DeepInversion (Yin et al. 2020): an input looks like the training data
  to a BatchNorm layer when the batch mean and variance of the layer's input match its
  ``running_mean`` / ``running_var``: ``||mu - running_mean||_2 + ||var - running_var||_2``.
  :class:`BNPrior` sums it over every BatchNorm of a model during a forward pass.
* :func:`class_balance_loss` — DAFL's information-entropy term (Chen et al. 2019):
  ``log C - H(mean softmax)``, zero when the batch is spread evenly over the classes.
* :func:`confidence_loss` — DAFL's one-hot term: the teacher's cross-entropy with its own
  arg-max, small when the teacher is sure of what it sees.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from slimtorch.core.errors import ConfigError

Disagreement = Literal["l1", "kl"]


def _same_shape(student: torch.Tensor, teacher: torch.Tensor) -> None:
    if student.shape != teacher.shape:
        raise ConfigError(
            f"student output {tuple(student.shape)} and teacher output {tuple(teacher.shape)}"
            " differ: data-free distillation needs the teacher's output size"
        )


def disagreement(
    student: torch.Tensor, teacher: torch.Tensor, kind: Disagreement = "l1"
) -> torch.Tensor:
    """How much ``student`` and ``teacher`` logits ``[..., C]`` disagree (>= 0, 0 iff equal).

    ``l1``: mean of ``|s - t|``; ``kl``: ``KL(softmax(t) || softmax(s))`` averaged over rows.
    """
    _same_shape(student, teacher)
    s, t = student.float(), teacher.float()
    if kind == "l1":
        return (s - t).abs().mean()
    if kind == "kl":
        if s.shape[-1] < 2:
            raise ConfigError(
                f"outputs {tuple(s.shape)} have one value per row: a softmax over it is always 1,"
                " so `kl` cannot see a difference; set data_free.disagreement: l1"
            )
        log_s, log_t = F.log_softmax(s, dim=-1), F.log_softmax(t, dim=-1)
        return (log_t.exp() * (log_t - log_s)).sum(dim=-1).mean()
    raise ConfigError(f"unknown disagreement {kind!r}; use 'l1' or 'kl'")


def batch_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance of a BatchNorm input ``[B, C, ...]``."""
    if x.dim() < 2:
        raise ConfigError(f"a BatchNorm input has a channel dim: got shape {tuple(x.shape)}")
    dims = [0, *range(2, x.dim())]
    return x.mean(dim=dims), x.var(dim=dims, unbiased=False)


def bn_prior_loss(
    mean: torch.Tensor, var: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor
) -> torch.Tensor:
    """DeepInversion's feature-statistics loss of one BatchNorm layer (0 when the batch matches):
    ``||mean - running_mean||_2 + ||var - running_var||_2``."""
    if mean.shape != running_mean.shape or var.shape != running_var.shape:
        raise ConfigError(
            f"batch statistics {tuple(mean.shape)} do not match the BatchNorm's running"
            f" statistics {tuple(running_mean.shape)}"
        )
    return torch.linalg.vector_norm(mean.float() - running_mean.float()) + torch.linalg.vector_norm(
        var.float() - running_var.float()
    )


def class_balance_loss(teacher: torch.Tensor) -> torch.Tensor:
    """``log C - H(mean_b softmax(teacher_b))`` for logits ``[B, C]``: 0 when the batch's mean
    prediction is uniform over the ``C`` classes, ``log C`` when every row picks one class."""
    probs = F.softmax(teacher.float().reshape(-1, teacher.shape[-1]), dim=-1).mean(dim=0)
    entropy = -(probs * probs.clamp_min(1e-12).log()).sum()
    return math.log(teacher.shape[-1]) - entropy


def confidence_loss(teacher: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of logits ``[..., C]`` with their own arg-max (DAFL's one-hot loss)."""
    flat = teacher.float().reshape(-1, teacher.shape[-1])
    return F.cross_entropy(flat, flat.argmax(dim=-1))


_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def has_bn_statistics(model: nn.Module) -> bool:
    """Whether ``model`` has a BatchNorm layer with running statistics (a prior to match)."""
    return any(isinstance(m, _BN) and m.running_mean is not None for m in model.modules())


class BNPrior:
    """The mean :func:`bn_prior_loss` over a model's BatchNorm layers with running statistics,
    collected by forward hooks while :meth:`attach`'s block runs (gradients reach the input)."""

    def __init__(self) -> None:
        self.terms: list[torch.Tensor] = []

    def _hook(self, module: nn.Module, inputs: tuple[Any, ...], _out: Any) -> None:
        mean, var = batch_moments(inputs[0])
        self.terms.append(bn_prior_loss(mean, var, module.running_mean, module.running_var))  # type: ignore[arg-type]

    @contextmanager
    def attach(self, model: nn.Module) -> Iterator[BNPrior]:
        """Collect the terms of ``model``'s forward passes inside the block (cleared first)."""
        self.terms = []
        handles = [
            m.register_forward_hook(self._hook)
            for m in model.modules()
            if isinstance(m, _BN) and m.running_mean is not None and m.running_var is not None
        ]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()

    def loss(self) -> torch.Tensor:
        """Mean term over the layers seen (0 without BatchNorm)."""
        if not self.terms:
            return torch.zeros(())
        return torch.stack(self.terms).mean()
