"""Cross-layer parameter sharing: repeated blocks share one weight tensor (the maths of
``share.tie``, whose recipe stage is in :mod:`slimtorch.share.stages`).

The blocks' parameters with the same relative name and shape become one ``nn.Parameter`` (the
mean of the tied tensors, or the first block's), the way ALBERT shares its Transformer layers.
The artifact stores a tied tensor once (as an alias) and ``slimtorch.load`` ties it again.
"""

from __future__ import annotations

import torch
from torch import nn


def tie_parameters(modules: list[nn.Module], names: list[str], reduce: str) -> int:
    """Make parameter ``name`` of every module in ``modules`` one shared Parameter; returns count."""
    tied = 0
    for rel in names:
        owners = []
        for block in modules:
            mod_name, _, pname = rel.rpartition(".")
            owner = block.get_submodule(mod_name) if mod_name else block
            owners.append((owner, pname))
        tensors = [getattr(o, p) for o, p in owners]
        with torch.no_grad():
            value = (
                torch.stack([t.detach() for t in tensors]).mean(0)
                if reduce == "mean"
                else tensors[0].detach()
            )
        shared = nn.Parameter(
            value.clone().to(tensors[0].dtype), requires_grad=tensors[0].requires_grad
        )
        for owner, pname in owners:
            setattr(owner, pname, shared)
        tied += 1
    return tied
