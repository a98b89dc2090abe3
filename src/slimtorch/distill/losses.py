"""Distillation losses: pure functions over tensors.

* :func:`soft_target_loss` — Hinton et al. (2015): ``T^2 * KL(softmax(t/T) || softmax(s/T))``.
  The ``T^2`` factor keeps the gradient's size about the same whatever the temperature, so the
  soft and hard terms can be mixed with one weight (:func:`mix_hard_soft`).
* :func:`hidden_state_loss` — MSE or cosine distance between hidden states, optionally through
  a learned linear projection when the student is narrower (TinyBERT's ``W_h``).
* :func:`attention_map_loss` — MSE or KL between attention probability maps, heads averaged
  or matched one to one (MiniLM / TinyBERT attention transfer).
* :func:`embedding_loss` — MSE or cosine distance between pooled outputs (sentence embeddings).

Every loss is a mean, so its scale does not depend on batch size or sequence length.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from slimtorch.core.errors import ConfigError

_EPS = 1e-12


def soft_target_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float
) -> torch.Tensor:
    """``T^2 * KL(softmax(teacher/T) || softmax(student/T))``, averaged over all leading dims.

    Logits are ``[..., classes]`` (``[B, C]`` or ``[B, L, V]``); zero iff the logits agree up to
    a constant per row.
    """
    if temperature <= 0:
        raise ConfigError(f"temperature must be > 0, got {temperature}")
    if student_logits.shape != teacher_logits.shape:
        raise ConfigError(
            f"student logits {tuple(student_logits.shape)} and teacher logits"
            f" {tuple(teacher_logits.shape)} differ: the student needs the teacher's output size"
        )
    log_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    kl = (log_t.exp() * (log_t - log_s)).sum(dim=-1)
    return kl.mean() * temperature**2


def mix_hard_soft(hard: torch.Tensor, soft: torch.Tensor, alpha: float) -> torch.Tensor:
    """``alpha * soft + (1 - alpha) * hard`` (alpha = 1: distillation only; 0: labels only)."""
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"alpha must be in [0, 1], got {alpha}")
    return alpha * soft + (1.0 - alpha) * hard


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 2.0,
    alpha: float = 0.5,
) -> torch.Tensor:
    """Hinton's loss: soft targets at ``temperature`` mixed with cross-entropy on ``labels``."""
    hard = F.cross_entropy(student_logits.reshape(-1, student_logits.shape[-1]), labels.reshape(-1))
    return mix_hard_soft(hard, soft_target_loss(student_logits, teacher_logits, temperature), alpha)


def masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``values [B, L, ...]`` over positions where ``mask [B, L]`` is set (all if None)."""
    if mask is None:
        return values.mean()
    m = mask.to(values.dtype)
    while m.dim() < values.dim():
        m = m.unsqueeze(-1)
    m = m.expand_as(values)
    return (values * m).sum() / m.sum().clamp(min=1.0)


def make_projection(student_dim: int, teacher_dim: int) -> nn.Linear | None:
    """A learned ``Linear(student_dim -> teacher_dim)`` when the widths differ, else None."""
    if student_dim < 1 or teacher_dim < 1:
        raise ConfigError(f"hidden widths must be >= 1, got {student_dim} and {teacher_dim}")
    return None if student_dim == teacher_dim else nn.Linear(student_dim, teacher_dim)


def _distance(s: torch.Tensor, t: torch.Tensor, kind: Literal["mse", "cosine"]) -> torch.Tensor:
    """Per-position distance over the last dim: mean squared error or ``1 - cos``."""
    if kind == "mse":
        return (s - t).pow(2).mean(dim=-1)
    if kind == "cosine":
        return 1.0 - F.cosine_similarity(s, t, dim=-1, eps=1e-8)
    raise ConfigError(f"unknown feature loss {kind!r}; use 'mse' or 'cosine'")


def hidden_state_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    kind: Literal["mse", "cosine"] = "mse",
    projection: nn.Module | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Distance between hidden states ``[B, L, Ds]`` and ``[B, L, Dt]`` (any leading dims).

    ``projection`` maps the student's width onto the teacher's; ``mask [B, L]`` leaves padding out.
    """
    s = student.float()
    if projection is not None:
        s = projection(s)
    t = teacher.float()
    if s.shape != t.shape:
        raise ConfigError(
            f"student features {tuple(s.shape)} do not match teacher features {tuple(t.shape)}"
            " (after projection); pair modules whose outputs have the same positions"
        )
    return masked_mean(_distance(s, t, kind), mask)


def embedding_loss(
    student: torch.Tensor, teacher: torch.Tensor, kind: Literal["mse", "cosine"] = "cosine"
) -> torch.Tensor:
    """Distance between pooled outputs ``[B, D]`` (e.g. sentence embeddings), mean over rows."""
    return hidden_state_loss(student, teacher, kind)


def _as_heads(probs: torch.Tensor) -> torch.Tensor:
    if probs.dim() == 3:
        return probs.unsqueeze(1)
    if probs.dim() != 4:
        raise ConfigError(
            f"attention maps must be [batch, heads, queries, keys] or [batch, queries, keys],"
            f" got shape {tuple(probs.shape)}"
        )
    return probs


def attention_map_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    kind: Literal["kl", "mse"] = "kl",
    heads: Literal["average", "match"] = "average",
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Distance between attention probability maps ``[B, H, Lq, Lk]`` (or ``[B, Lq, Lk]``).

    ``heads="average"`` compares the head-averaged maps (works for any head counts);
    ``"match"`` compares head i with head i. ``kl`` is ``KL(teacher row || student row)``;
    ``mse`` the mean squared difference over keys. ``mask [B, Lq]`` leaves padded queries out.
    """
    s, t = _as_heads(student.float()), _as_heads(teacher.float())
    if heads == "average":
        s, t = s.mean(dim=1, keepdim=True), t.mean(dim=1, keepdim=True)
    elif s.shape[1] != t.shape[1]:
        raise ConfigError(
            f"heads='match' needs equal head counts, got student {s.shape[1]} and teacher"
            f" {t.shape[1]}; use heads='average'"
        )
    if s.shape != t.shape:
        raise ConfigError(
            f"attention maps differ in shape: student {tuple(s.shape)}, teacher {tuple(t.shape)}"
        )
    if kind == "kl":
        per_row = (t * (t.clamp_min(_EPS).log() - s.clamp_min(_EPS).log())).sum(dim=-1)
    elif kind == "mse":
        per_row = (s - t).pow(2).mean(dim=-1)
    else:
        raise ConfigError(f"unknown attention loss {kind!r}; use 'kl' or 'mse'")
    # per_row: [B, H, Lq]; the query mask is [B, Lq].
    per_row = per_row.transpose(1, 2)  # [B, Lq, H]
    return masked_mean(per_row, mask)
