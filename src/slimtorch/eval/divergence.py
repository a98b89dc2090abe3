"""How far a compressed causal LM's next-token distribution is from its base's, on the same tokens.

What llama.cpp's ``llama-perplexity --kl-divergence`` reports: per position the KL divergence
``KL(P_base || Q) = sum_v p_base(v) (log p_base(v) - log q(v))`` of the compressed model's
distribution ``Q`` from the base model's ``P_base``, its mean and 99th percentile over all
positions, and the share of positions where both models' top-1 token is the same. Log-softmax is
taken in float64, so identical logits give exactly 0 and tiny divergences do not drown in
float32 rounding. Unlike llama-perplexity, which scores the second half of each window only,
every position that has a next token is scored (the same positions as GPTQ's perplexity).

:func:`compare` runs both models window batch by window batch and keeps only per-position
divergences (one float a position), never the logits of the whole set.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from slimtorch.calibrate.lm import logits_of
from slimtorch.core.errors import UserInputError

ROWS = 128  # positions per float64 log-softmax chunk: [128, V] at a time


def _flat(logits: torch.Tensor) -> torch.Tensor:
    return logits.reshape(-1, logits.shape[-1])


def _check(base_logits: torch.Tensor, logits: torch.Tensor) -> None:
    if base_logits.shape != logits.shape or logits.dim() < 2:
        raise UserInputError(
            f"KL divergence needs two logit tensors of one shape [..., vocab], got"
            f" {tuple(base_logits.shape)} and {tuple(logits.shape)}; run both models on the"
            " same token windows (and the same vocabulary)"
        )


def token_kld(base_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """``KL(base || model)`` per position (float64 ``[N]``) of two logit tensors ``[..., V]``."""
    _check(base_logits, logits)
    base, other = _flat(base_logits), _flat(logits)
    out = []
    for start in range(0, base.shape[0], ROWS):
        log_p = base[start : start + ROWS].double().log_softmax(-1)
        log_q = other[start : start + ROWS].double().log_softmax(-1)
        out.append((log_p.exp() * (log_p - log_q)).sum(-1).clamp_min(0.0))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


def top1_agrees(base_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Whether both top-1 tokens are the same, per position (bool ``[N]``)."""
    _check(base_logits, logits)
    return _flat(base_logits).argmax(-1) == _flat(logits).argmax(-1)


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood (float64 ``[N]``) of ``targets [...]`` under ``logits [..., V]``."""
    flat, ids = _flat(logits), targets.reshape(-1)
    out = []
    for start in range(0, flat.shape[0], ROWS):
        log_q = flat[start : start + ROWS].double().log_softmax(-1)
        out.append(-log_q.gather(1, ids[start : start + ROWS, None]).squeeze(1))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


def percentile(values: torch.Tensor, q: float) -> float:
    """The ``q``-th percentile (0-100) of ``values``, linear interpolation (numpy's default)."""
    if values.numel() == 0:
        raise UserInputError("no positions to take a percentile of; give at least one window")
    return float(np.percentile(values.double().cpu().numpy(), q))


@dataclass
class DivergenceStats:
    """Per-position figures accumulated over window batches: KLD, top-1 agreement, NLLs."""

    kld: list[torch.Tensor] = field(default_factory=list)
    agree: int = 0
    nll: float = 0.0
    base_nll: float = 0.0

    @property
    def positions(self) -> int:
        return sum(k.numel() for k in self.kld)

    def add(self, base_logits: torch.Tensor, logits: torch.Tensor, ids: torch.Tensor) -> None:
        """Score logits ``[B, L, V]`` of both models on ids ``[B, L]`` (positions 0..L-2)."""
        base_logits, logits = base_logits[:, :-1], logits[:, :-1]
        self.kld.append(token_kld(base_logits, logits).cpu())
        self.agree += int(top1_agrees(base_logits, logits).sum())
        targets = ids[:, 1:].to(logits.device)
        self.nll += float(token_nll(logits, targets).sum())
        self.base_nll += float(token_nll(base_logits, targets).sum())

    def extend(self, other: DivergenceStats) -> None:
        """Pool ``other``'s positions into these."""
        self.kld.extend(other.kld)
        self.agree += other.agree
        self.nll += other.nll
        self.base_nll += other.base_nll

    def summary(self) -> dict[str, float]:
        """``perplexity``, ``baseline_perplexity``, ``kld_mean``, ``kld_p99``,
        ``top1_agreement`` (0-1) and ``positions`` scored."""
        n = self.positions
        if n == 0:
            raise UserInputError("no positions scored; give windows of at least 2 tokens")
        kld = torch.cat(self.kld)
        return {
            "perplexity": math.exp(self.nll / n),
            "baseline_perplexity": math.exp(self.base_nll / n),
            "kld_mean": float(kld.mean()),
            "kld_p99": percentile(kld, 99.0),
            "top1_agreement": self.agree / n,
            "positions": float(n),
        }


def _logits(output: Any) -> torch.Tensor:
    try:
        logits = logits_of(output)
    except TypeError:
        logits = None
    if logits is None or logits.dim() != 3:
        raise UserInputError(
            "KL divergence needs causal LMs returning logits [batch, tokens, vocab] (e.g."
            " transformers *ForCausalLM)"
        )
    return logits


@torch.no_grad()
def compare(
    model: nn.Module,
    base: nn.Module,
    windows: torch.Tensor,
    device: str = "cpu",
    batch: int = 1,
    stats: DivergenceStats | None = None,
) -> DivergenceStats:
    """Run ``model`` and ``base`` on token ``windows [N, L]``, ``batch`` windows at a time,
    accumulating into ``stats`` (a new one by default); only per-position figures are kept."""
    if windows.dim() != 2 or windows.shape[1] < 2 or windows.dtype != torch.int64:
        raise UserInputError(
            f"give token windows as int64 [windows, tokens >= 2], got {tuple(windows.shape)}"
            f" {windows.dtype}"
        )
    stats = stats if stats is not None else DivergenceStats()
    modes = (model.training, base.training)
    model.eval()
    base.eval()
    try:
        for start in range(0, windows.shape[0], batch):
            ids = windows[start : start + batch].to(device)
            stats.add(_logits(base(ids)), _logits(model(ids)), ids)
    finally:
        model.train(modes[0])
        base.train(modes[1])
    return stats


def divergence(
    model: nn.Module, base: nn.Module, windows: torch.Tensor, device: str = "cpu", batch: int = 1
) -> dict[str, float]:
    """The LLM quality figures of ``model`` against ``base`` on token ``windows [N, L]``:
    ``perplexity``, ``baseline_perplexity``, ``kld_mean``, ``kld_p99``, ``top1_agreement``."""
    return compare(model, base, windows, device, batch).summary()
