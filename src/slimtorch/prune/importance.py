"""Channel importance for structured pruning, per group of coupled channels.

Every member of a group (each layer dim the channels touch) contributes: the weights a handler
exposes for that dim are reduced to one score per channel, and the group's score is the sum
over members. Criteria: ``l1``/``l2`` magnitude, ``taylor`` (first order, |w * dL/dw|, needs
gradients), ``fpgm`` (distance to the other channels: the geometric-median criterion),
``bn_scale`` (|gamma| of the BatchNorms in the group: network slimming), ``activation`` (mean
|output| of the producing layers, from calibration data), ``random`` (a seeded baseline).
"""

from __future__ import annotations

import torch
from torch import nn

from slimtorch.graph.dependency import Group, Member
from slimtorch.graph.handlers import handler_for

CRITERIA = ("l1", "l2", "taylor", "fpgm", "bn_scale", "activation", "random")


def position_norms(tensor: torch.Tensor, axis: int, p: float) -> torch.Tensor:
    """``sum |x|^p`` over everything but ``axis``: one value per position of ``axis``."""
    rows = tensor.detach().float().movedim(axis, 0).reshape(tensor.shape[axis], -1)
    return rows.abs().pow(p).sum(1)


def per_channel(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Positions -> channels: channel ``c`` sums ``values[index[c]]``."""
    return values[index].sum(1)


def fpgm_scores(vectors: torch.Tensor) -> torch.Tensor:
    """Sum of Euclidean distances from each row to the others: rows near the geometric median
    of the layer are the most replaceable (He et al., 2019)."""
    v = vectors.float()
    return torch.cdist(v[None], v[None])[0].sum(1)


def _member_rows(module: nn.Module, member: Member, grads: bool = False) -> list[torch.Tensor]:
    handler = handler_for(module)
    assert handler is not None
    pairs = handler.grads(module, member.dim) if grads else handler.weights(module, member.dim)
    rows = []
    for tensor, axis in pairs:
        if tensor is None:
            rows.append(torch.zeros(0))
            continue
        r = tensor.detach().float().movedim(axis, 0).reshape(tensor.shape[axis], -1)
        rows.append(r[member.index].reshape(member.index.shape[0], -1))
    return rows


def member_score(module: nn.Module, member: Member, criterion: str) -> torch.Tensor | None:
    """One score per channel from one member, or None when it has nothing for ``criterion``."""
    rows = _member_rows(module, member)
    if criterion in ("l1", "l2"):
        p = 1.0 if criterion == "l1" else 2.0
        scores = [r.abs().pow(p).sum(1) for r in rows if r.numel()]
        return torch.stack(scores).sum(0) if scores else None
    if criterion == "taylor":
        grads = _member_rows(module, member, grads=True)
        scores = [
            (w * g).abs().sum(1)
            for w, g in zip(rows, grads, strict=True)
            if g.numel() and w.numel()
        ]
        return torch.stack(scores).sum(0) if scores else None
    if criterion == "fpgm":
        vectors = torch.cat([r for r in rows if r.numel()], dim=1) if rows else None
        return fpgm_scores(vectors) if vectors is not None and vectors.numel() else None
    if criterion == "bn_scale":
        if not type(module).__name__.startswith("BatchNorm") or not rows:
            return None
        return rows[0].abs().sum(1)
    raise ValueError(f"unknown importance {criterion!r}; choose one of {CRITERIA}")


def group_scores(
    model: nn.Module,
    group: Group,
    criterion: str,
    activations: dict[str, torch.Tensor] | None = None,
    seed: int = 0,
) -> torch.Tensor:
    """Importance of each channel of ``group`` (higher = keep)."""
    if criterion == "random":
        gen = torch.Generator().manual_seed(seed * 7919 + group.id)
        return torch.rand(group.size, generator=gen)
    if criterion == "activation":
        found = [
            per_channel(_fold(activations[m.module], m), m.index)
            for m in group.members
            if m.dim == "out" and activations and m.module in activations
        ]
        if found:
            return torch.stack(found).sum(0)
        criterion = "l1"  # internal dims (heads) have no single output to measure
    total = torch.zeros(group.size)
    used = False
    for member in group.members:
        score = member_score(model.get_submodule(member.module), member, criterion)
        if score is not None:
            total += score.to(total.device)  # CUDA weights: summed on the CPU
            used = True
    if not used and criterion != "l1":
        return group_scores(model, group, "l1")
    return total


def _fold(values: torch.Tensor, member: Member) -> torch.Tensor:
    """Output features -> the member's unit positions (a bidirectional RNN's output is 2H)."""
    units = int(member.index.max()) + 1
    if values.numel() % units == 0 and values.numel() != units:
        return values.reshape(-1, units).sum(0)
    return values
