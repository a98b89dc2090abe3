"""Weight reordering: channel permutations that change no output but help later stages (the
maths of ``prune.permute`` and ``prune.reorder``, whose recipe stages are in
:mod:`slimtorch.prune.stages.reorder`).

:func:`consumer_matrix` gives the columns of a consumer that an N:M permutation
(:func:`slimtorch.prune.permutation.find_permutation`) reorders; :func:`importance_order` orders
a group's channels by importance, most important first, so that the first k channels of every
group form a sub-network.
"""

from __future__ import annotations

import torch
from torch import nn

from slimtorch.graph.dependency import Member
from slimtorch.prune.permutation import channel_matrix


def consumer_matrix(model: nn.Module, member: Member, m: int) -> torch.Tensor | None:
    """The columns of a Linear/Conv consumer that read the group's channels, as ``[rows, C]``,
    or None when its N:M groups do not line up with the channels (then it is left out)."""
    module = model.get_submodule(member.module)
    kinds = {c.__name__ for c in type(module).__mro__}
    if member.dim != "in" or not kinds & {"Linear", "Conv1d", "Conv2d", "Conv3d"}:
        return None
    if member.index.shape[1] != 1 or getattr(module, "groups", 1) != 1:
        return None
    cols = member.index[:, 0]
    start = int(cols.min())
    if start % m or not torch.equal(cols, torch.arange(start, start + cols.numel())):
        return None
    weight = module.weight.detach()  # type: ignore[union-attr,operator]
    return channel_matrix(weight)[:, start : start + cols.numel()]


def consumer_blocks(model: nn.Module, member: Member) -> torch.Tensor | None:
    """The weight of a Linear/Conv consumer restricted to the group's input channels, in its
    memory order as ``[out, C, k]`` (``k``: the kernel, or the columns a flattened channel
    owns; 1 for a plain Linear), or None where the channels' columns are not one contiguous
    run in channel order (then it is left out). For objectives on the
    stored layout, such as the index of a sparse weight (:func:`slimtorch.prune.genetic.index_fitness`)."""
    module = model.get_submodule(member.module)
    kinds = {c.__name__ for c in type(module).__mro__}
    if member.dim != "in" or not kinds & {"Linear", "Conv1d", "Conv2d", "Conv3d"}:
        return None
    if getattr(module, "groups", 1) != 1:
        return None
    cols = member.index.reshape(-1)  # a channel may own several columns (a flatten before it)
    start = int(cols.min())
    if not torch.equal(cols, torch.arange(start, start + cols.numel())):
        return None
    weight = module.weight.detach()  # type: ignore[union-attr,operator]
    part = weight[:, start : start + cols.numel()]
    return part.reshape(part.shape[0], member.index.shape[0], -1)


def importance_order(scores: torch.Tensor, blocks: int = 1) -> torch.Tensor:
    """Channels by decreasing score, block by block (blocks keep their own channels)."""
    per = scores.numel() // blocks
    parts = [
        torch.argsort(scores[b * per : (b + 1) * per], descending=True, stable=True) + b * per
        for b in range(blocks)
    ]
    return torch.cat(parts)
