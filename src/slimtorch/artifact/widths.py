"""Serving a ``prune.reorder``-ed model at a fraction of its width (``slimtorch.load(dir,
width=0.5)``).

``prune.reorder`` records every channel group, its channels ordered by importance, in
:attr:`ModelInfo.widths <slimtorch.core.info.ModelInfo.widths>`; ``train.slimmable`` adds the
BatchNorm statistics of each trained width in ``width_stats``. :func:`narrow` keeps the first
``width`` of every group's channels and those statistics.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from slimtorch.core.errors import ArtifactError, UserInputError
from slimtorch.core.info import model_info, update_info
from slimtorch.graph.dependency import DependencyGraph, Group, Member
from slimtorch.graph.surgery import apply_channels


def available_widths(model: nn.Module) -> bool:
    """Whether ``model`` was reordered by ``prune.reorder`` and can run narrower."""
    return bool(model_info(model).widths)


def width_key(width: float) -> str:
    """How a width names its entry in ``width_stats`` (``0.5`` -> ``"0.5"``)."""
    return f"{width:g}"


def _width_statistics(model: nn.Module, width: float) -> None:
    """Load the BatchNorm statistics ``train.slimmable`` recorded for ``width``, if any."""
    stats = model_info(model).width_stats or {}
    update_info(model, width_stats=None)
    for name, values in stats.get(width_key(width), {}).items():
        owner, _, leaf = name.rpartition(".")
        module = model.get_submodule(owner) if owner else model
        buf = module._buffers.get(leaf)
        value = torch.tensor(values, dtype=buf.dtype if buf is not None else torch.float32)
        if buf is None or buf.shape != value.shape:
            raise ArtifactError(
                f"the statistics recorded for width {width} do not fit {name}"
                f" ({tuple(value.shape)}); re-save the artifact"
            )
        module._buffers[leaf] = value


def narrow(model: nn.Module, width: float) -> nn.Module:
    """A copy of a ``prune.reorder``-ed model keeping the first ``width`` of every group's
    channels (the most important ones); ``width=1`` returns an unchanged copy."""
    groups_meta = model_info(model).widths
    if not groups_meta:
        raise UserInputError(
            "this model has no width ordering: compress it with a recipe that ends with"
            " `prune.reorder` (see examples/recipes/*multiwidth*.yaml) to serve it at several widths"
        )
    if not 0 < width <= 1:
        raise UserInputError(f"width must be in (0, 1], got {width}")
    groups, keep = [], {}
    for i, g in enumerate(groups_meta):
        members = [
            Member(m, d, torch.tensor(index, dtype=torch.int64)) for m, d, index in g["members"]
        ]
        size, blocks = int(g["size"]), int(g["blocks"])
        groups.append(Group(i, size, members, blocks))
        count = max(1, round(size * width / blocks)) * blocks
        per = size // blocks
        keep[i] = torch.cat([torch.arange(count // blocks) + b * per for b in range(blocks)])
    out = copy.deepcopy(model)
    apply_channels(out, DependencyGraph(groups), keep)
    _width_statistics(out, width)
    update_info(out, widths=None, width=width)
    return out
