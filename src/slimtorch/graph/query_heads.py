"""Query heads inside grouped-query attention groups: keep the same number of query heads in
every key/value group (each group may keep different ones), the key/value heads all stay.

In grouped-query attention query head ``g * G + j`` (``G = num_heads // num_kv``) reads
key/value head ``g``; the forward repeats each key/value head ``num_key_value_groups`` times, so
every group must keep the same count ``k``. Keeping heads ``keep[g]`` of group ``g`` slices the
query projection's rows and the output projection's columns and sets ``num_heads`` (``k *
num_kv``) and ``num_key_value_groups`` (``k``) where the module holds them. Whole key/value
groups are pruned by the ``heads`` dim of :mod:`slimtorch.graph.hf_attention` instead.
"""

from __future__ import annotations

import torch
from torch import nn

from slimtorch.core.errors import ConfigError
from slimtorch.graph.hf_attention import (
    NUM_HEADS_ATTRS,
    WIDTH_ATTRS,
    AttentionParts,
    _parts,
    _refuse_states,
    _slice_linear,
    head_index,
)


def query_head_views(parts: AttentionParts) -> tuple[torch.Tensor, torch.Tensor]:
    """The query weight as ``[num_kv, G, head_dim * in]`` and the output weight's columns as
    ``[num_kv, G, out * head_dim]``: one row per query head, grouped by key/value head."""
    nkv, g, d = parts.num_kv, parts.groups, parts.head_dim
    q = parts.q.weight.detach().reshape(nkv, g, d * parts.q.in_features)
    o = parts.o.weight.detach().reshape(parts.o.out_features, nkv, g, d)
    return q, o.permute(1, 2, 0, 3).reshape(nkv, g, -1)


def check_group_keep(keep: torch.Tensor, parts: AttentionParts) -> torch.Tensor:
    """``keep`` as ``[num_kv, k]`` int64 query-head indices within each group (0..G-1)."""
    if keep.dim() != 2 or keep.shape[0] != parts.num_kv or keep.dtype.is_floating_point:
        raise ConfigError(
            f"keep must be an integer tensor [num_kv={parts.num_kv}, k] of query heads per group"
        )
    keep = keep.to(torch.int64)
    if keep.shape[1] == 0:
        raise ConfigError("keep at least one query head in every key/value group")
    if int(keep.min()) < 0 or int(keep.max()) >= parts.groups:
        raise ConfigError(f"query heads within a group lie in [0, {parts.groups})")
    if any(row.unique().numel() != row.numel() for row in keep):
        raise ConfigError("query heads kept in a group must be unique")
    return torch.sort(keep, dim=1).values


def keep_query_heads(module: nn.Module, keep: torch.Tensor) -> int:
    """Keep query heads ``keep[g]`` of every key/value group ``g`` of the attention ``module``;
    returns the new query head count."""
    parts = _parts(module)
    keep = check_group_keep(keep, parts)
    _refuse_states(parts)
    k = int(keep.shape[1])
    heads = (keep + torch.arange(parts.num_kv)[:, None] * parts.groups).reshape(-1)
    rows = head_index(heads, parts.head_dim)
    _slice_linear(parts.q, rows, None)
    _slice_linear(parts.o, None, rows)
    new = {
        NUM_HEADS_ATTRS: (parts.num_heads, k * parts.num_kv),
        WIDTH_ATTRS: (parts.num_heads * parts.head_dim, k * parts.num_kv * parts.head_dim),
        ("num_key_value_groups",): (parts.groups, k),
    }
    for owner in {id(parts.core): parts.core, id(module): module}.values():
        for names, (old, value) in new.items():
            for name in names:
                if owner.__dict__.get(name) == old:
                    setattr(owner, name, value)
    return k * parts.num_kv
