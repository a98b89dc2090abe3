"""Depth pruning maths: how much each block of a stack changes its input, and which to drop.

Block influence (ShortGPT, Men et al., 2024): ``BI_i = 1 - cos(x_i, x_{i+1})`` averaged over
tokens, where ``x_i`` and ``x_{i+1}`` are the hidden states entering and leaving block ``i``. A
block whose output is nearly its input (cosine close to 1) does little and is the first to go.
The other criteria measure what dropping one block alone costs the model's output (the task
loss, or the KL divergence of the next-token distribution from the full model's): the larger
the cost, the more the block matters. Every score here is "higher = keep".
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from slimtorch.core.errors import ConfigError


def influence_terms(x_in: torch.Tensor, x_out: torch.Tensor) -> torch.Tensor:
    """``1 - cos`` between a block's input and output hidden states, one value per token
    (vectors along the last axis; float64). A token whose input or output is all zeros counts
    as unchanged only if both are (cosine of a zero vector: 0 change if equal, else 1)."""
    if x_in.shape != x_out.shape:
        raise ConfigError(
            f"a block's output {tuple(x_out.shape)} is not shaped like its input"
            f" {tuple(x_in.shape)}: block influence compares hidden states of one size"
        )
    a = x_in.reshape(-1, x_in.shape[-1]).double()
    b = x_out.reshape(-1, x_out.shape[-1]).double()
    cos = F.cosine_similarity(a, b, dim=-1, eps=1e-12)
    same = (a == b).all(dim=-1)
    return torch.where(same, torch.zeros_like(cos), 1 - cos)


class InfluenceSum:
    """Running mean of :func:`influence_terms` over every token of every batch of one block."""

    def __init__(self) -> None:
        self.total = 0.0
        self.count = 0

    def update(self, x_in: torch.Tensor, x_out: torch.Tensor) -> None:
        terms = influence_terms(x_in, x_out)
        self.total += float(terms.sum())
        self.count += terms.numel()

    def mean(self) -> float:
        if self.count == 0:
            raise ConfigError("no calibration tokens reached the block; check --data")
        return self.total / self.count


def next_token_kld(base_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Mean KL(base || other) of the next-token distributions, over every position (float64)."""
    p = F.log_softmax(base_logits.double(), dim=-1)
    q = F.log_softmax(logits.double(), dim=-1)
    return (p.exp() * (p - q)).sum(dim=-1).mean()


def drop_count(total: int, fraction: float | None = None, count: int | None = None) -> int:
    """How many of ``total`` blocks to drop: ``count``, or ``fraction`` of them rounded (at
    least one); every block but one at most."""
    if (fraction is None) == (count is None):
        raise ConfigError("give exactly one of `fraction` and `count`")
    n = count if count is not None else max(1, round(total * float(fraction or 0)))
    if not 1 <= n < total:
        raise ConfigError(
            f"cannot drop {n} of {total} blocks: drop at least one and keep at least one"
            " (lower `fraction`/`count`)"
        )
    return n


def lowest(scores: list[float], n: int) -> list[int]:
    """The indices of the ``n`` lowest scores, ascending by index (ties: the later block goes
    first, since later blocks of an LLM are the usual redundant ones)."""
    if not 0 <= n <= len(scores):
        raise ConfigError(f"cannot choose {n} of {len(scores)} blocks")
    order = sorted(range(len(scores)), key=lambda i: (scores[i], -i))
    return sorted(order[:n])


def check_blocks(blocks: list[int], total: int) -> list[int]:
    """Explicit block indices to drop: unique, in ``0 .. total - 1``, at least one kept."""
    out = sorted({int(b) for b in blocks})
    if len(out) != len(blocks):
        raise ConfigError(f"`blocks` {blocks} lists a block twice")
    bad = [b for b in out if not 0 <= b < total]
    if bad:
        raise ConfigError(f"`blocks` {bad} out of range: the model has blocks 0..{total - 1}")
    if not out or len(out) >= total:
        raise ConfigError(
            f"`blocks` must drop at least one and keep at least one of the {total} blocks"
        )
    return out
