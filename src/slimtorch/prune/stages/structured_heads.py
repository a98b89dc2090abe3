"""The recipe stage ``prune.query_heads``: remove query heads inside every grouped-query
attention group, the same number from each group, for real.

    - method: prune.query_heads
      ratio: 0.34              # SmolLM2: 3 -> 2 query heads per key/value head (9 -> 6)
      importance: taylor       # |sum w * dL/dw| over the head's q rows and o columns, on --data

Whole key/value groups (with their query heads) are pruned by ``prune.structured`` (its
``heads`` dim); this stage keeps every key/value head and thins the query heads that share it,
choosing per group (:mod:`slimtorch.graph.query_heads`). ``importance``: ``taylor`` (first-order
loss change of removing the head, LLM-Pruner's group Taylor score, one backward pass per
calibration batch of 32 windows) or ``l2`` (product of the L2 norms of the head's query rows and
output columns, no data). ``targets`` selects attention modules (default: all). Saved artifacts,
``slimtorch.load`` and ``export --to hf`` see the new head counts.
"""

from __future__ import annotations

import logging
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from slimtorch.calibrate.inputs import accumulate_gradients
from slimtorch.core.config import StageConfig
from slimtorch.core.errors import ConfigError, UnsupportedModelError
from slimtorch.core.methods import Run, register_method
from slimtorch.core.targets import Targets
from slimtorch.graph.hf_attention import AttentionParts, find_attention
from slimtorch.graph.query_heads import keep_query_heads
from slimtorch.graph.surgery import resized_modules
from slimtorch.prune.structured import keep_count

log = logging.getLogger(__name__)


class QueryHeadsConfig(StageConfig):
    """Remove a share of the query heads of every grouped-query attention group."""

    ratio: float = Field(gt=0, lt=1, description="share of each group's query heads removed")
    importance: Literal["taylor", "l2"] = "taylor"
    calibration_batches: int = Field(default=1, ge=1, description="for taylor: 32 windows each")


def _views(parts: AttentionParts, grad: bool) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Query rows and output columns per head, ``[num_kv, G, -1]`` each (or their grads)."""
    q, o = parts.q.weight, parts.o.weight
    tq, to = (q.grad, o.grad) if grad else (q, o)
    if tq is None or to is None:
        return None
    nkv, g, d = parts.num_kv, parts.groups, parts.head_dim
    qv = tq.detach().reshape(nkv, g, -1)
    ov = to.detach().reshape(-1, nkv, g, d).permute(1, 2, 0, 3).reshape(nkv, g, -1)
    return qv, ov


def head_scores(parts: AttentionParts, importance: str) -> torch.Tensor:
    """One score per query head, ``[num_kv, G]`` (higher = keep)."""
    weights = _views(parts, grad=False)
    assert weights is not None
    if importance == "l2":
        return weights[0].norm(dim=-1) * weights[1].norm(dim=-1)
    grads = _views(parts, grad=True)
    if grads is None:
        raise ConfigError("prune.query_heads (taylor): the calibration pass gave no gradients")
    return sum(((w * g).sum(-1).abs() for w, g in zip(weights, grads, strict=True)), torch.zeros(1))


def _attention(model: nn.Module, config: QueryHeadsConfig) -> dict[str, AttentionParts]:
    sel = Targets.of(config.targets, config.ignore)
    found: dict[str, AttentionParts] = {}
    for name, module in model.named_modules():
        parts = find_attention(module)
        if parts is not None and sel.selects(name, module):
            found[name] = parts
    grouped = {n: p for n, p in found.items() if p.groups > 1}
    if not grouped:
        raise UnsupportedModelError(
            "prune.query_heads needs grouped-query attention with more than one query head per"
            f" key/value head; {len(found)} attention module(s) matched, none has that (use"
            " prune.structured to remove whole heads)"
        )
    return grouped


@register_method(
    "prune.query_heads",
    QueryHeadsConfig,
    "remove query heads inside each grouped-query attention group (same count per group)",
    example={"ratio": 0.5},
)
def prune_query_heads(model: nn.Module, config: QueryHeadsConfig, run: Run) -> None:
    found = _attention(model, config)
    if config.importance == "taylor":
        task = run.require_task("prune.query_heads (importance: taylor)")
        accumulate_gradients(model, task, run.ctx, config.calibration_batches)
    try:
        plans = {}
        for name, parts in found.items():
            k = keep_count(parts.groups, config.ratio)
            if k < parts.groups:
                scores = head_scores(parts, config.importance)
                plans[name] = torch.topk(scores, k, dim=1).indices
    finally:
        if config.importance == "taylor":
            model.zero_grad(set_to_none=True)
    hidden = getattr(getattr(model, "config", None), "hidden_size", None)
    for name, keep in plans.items():
        heads = keep.numel()
        if isinstance(hidden, int) and hidden % heads:
            raise ConfigError(
                f"prune.query_heads: {name} would keep {heads} query heads, which does not divide"
                f" hidden_size {hidden} (transformers refuses such a config); choose a ratio whose"
                " kept head count divides it"
            )
    if not plans:
        raise ConfigError(
            f"prune.query_heads: ratio {config.ratio} removes no query head from groups of"
            f" {sorted({p.groups for p in found.values()})}; raise the ratio"
        )
    for name, keep in plans.items():
        heads = keep_query_heads(model.get_submodule(name), keep)
        log.debug("prune.query_heads %s: %d query heads", name, heads)
    resized_modules(model).update(plans)
    log.info("prune.query_heads: %d attention modules thinned", len(plans))
