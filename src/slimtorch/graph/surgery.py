"""Apply channel choices to a model: each group keeps (or reorders) its channels, and every layer
dim it touches is cut once by its handler.

``keep[g]`` lists the channels group ``g`` keeps, in the order they should end up in (a
permutation of all channels only reorders them: the function is unchanged). A layer dim reached
by several groups (the input of a layer after a ``cat``) is cut once with all of them applied.
Modules that were cut are recorded on the model (``resized_modules``) so that the artifact
stores their new attributes and ``slimtorch.load`` rebuilds the smaller architecture.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from slimtorch.core.errors import ConfigError
from slimtorch.graph.dependency import DependencyGraph, Group, Member
from slimtorch.graph.handlers import handler_for
from slimtorch.graph.weights import replace_module

RESIZED_ATTR = "_slimtorch_resized"


def resized_modules(model: nn.Module) -> set[str]:
    """Names of the modules whose shapes structured pruning changed."""
    found: set[str] = model.__dict__.setdefault(RESIZED_ATTR, set())
    return found


def dim_order(length: int, parts: list[tuple[Member, torch.Tensor]]) -> torch.Tensor:
    """New order of a layer dim of ``length`` positions, given each group's kept channels."""
    keys = torch.arange(length)
    vals = torch.arange(length)
    alive = torch.ones(length, dtype=torch.bool)
    for member, keep in parts:
        index = member.index
        alive[index.flatten()] = False
        if keep.numel() == 0:
            continue
        ordered = torch.sort(keep).values
        slot_keys = index[ordered].flatten()
        slot_vals = index[keep].flatten()
        order = torch.argsort(slot_keys)
        keys[slot_keys[order]] = slot_keys[order]
        vals[slot_keys[order]] = slot_vals[order]
        alive[slot_keys] = True
    return vals[alive]


def check_keep(group: Group, keep: torch.Tensor) -> torch.Tensor:
    """``keep`` as int64, validated against the group (unique, in range, blocks balanced)."""
    keep = torch.as_tensor(keep, dtype=torch.int64).flatten()
    if keep.numel() == 0:
        raise ConfigError(f"{group.describe()}: cannot remove every channel; lower the ratio")
    if (
        keep.unique().numel() != keep.numel()
        or int(keep.min()) < 0
        or int(keep.max()) >= group.size
    ):
        raise ConfigError(f"{group.describe()}: kept channels must be unique and in range")
    if group.blocks > 1:
        block = keep // (group.size // group.blocks)
        per = torch.bincount(block, minlength=group.blocks)
        if bool((per != per[0]).any()) or bool((block.diff() < 0).any()):
            raise ConfigError(
                f"{group.describe()}: keep the same number of channels in each of its"
                f" {group.blocks} blocks (grouped convolution / GroupNorm), listed block by"
                " block"
            )
    return keep


def apply_channels(
    model: nn.Module, graph: DependencyGraph, keep: Mapping[int, torch.Tensor]
) -> list[str]:
    """Cut (or reorder) the channels of the groups in ``keep``; returns the modules changed."""
    by_id = {g.id: g for g in graph.groups}
    parts: dict[tuple[str, str], list[tuple[Member, torch.Tensor]]] = {}
    for gid, chosen in keep.items():
        group = by_id[gid]
        if group.frozen is not None:
            raise ConfigError(f"{group.describe()} cannot be pruned: {group.frozen}")
        chosen = check_keep(group, chosen)
        if chosen.numel() == group.size and torch.equal(chosen, torch.arange(group.size)):
            continue
        for member in group.members:
            parts.setdefault((member.module, member.dim), []).append((member, chosen))
    ties = _tied_weights(model)
    changed = []
    for (name, dim), dim_parts in parts.items():
        module = model.get_submodule(name)
        handler = handler_for(module)
        if handler is None:
            raise ConfigError(f"{name}: no layer handler for {type(module).__name__}")
        length = handler.dims(module)[dim]
        order = dim_order(length, dim_parts)
        new = handler.prune(module, dim, order)
        if new is not None:
            replace_module(model, name, new)
        changed.append(name)
    _retie(model, ties)
    resized_modules(model).update(changed)
    return sorted(set(changed))


def _tied_weights(model: nn.Module) -> list[tuple[str, str]]:
    """(alias, owner) parameter names that share one tensor."""
    first: dict[int, str] = {}
    ties = []
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first:
            ties.append((name, first[id(param)]))
        else:
            first[id(param)] = name
    return ties


def _retie(model: nn.Module, ties: list[tuple[str, str]]) -> None:
    params = dict(model.named_parameters(remove_duplicate=False))
    for alias, owner in ties:
        if alias in params and owner in params and params[alias] is not params[owner]:
            mname, _, pname = alias.rpartition(".")
            setattr(model.get_submodule(mname) if mname else model, pname, params[owner])


# ---------------------------------------------------------------- removing whole blocks

LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")
PER_LAYER_KEYS = ("layer_types",)


def keep_blocks(model: nn.Module, container: str, keep: list[int]) -> nn.ModuleList:
    """Keep only the blocks ``keep`` (ascending indices) of the nn.ModuleList ``container``.

    The kept blocks are the same modules (weights and compression states kept), renumbered:
    every int ``layer_idx`` inside block ``j`` (Hugging Face KV-cache slots) becomes ``j``. A
    config on the model (``model.config``) gets its layer count (``num_hidden_layers``,
    ``n_layer``, ``num_layers``) and per-layer lists (``layer_types``) cut to match."""
    blocks = model.get_submodule(container)
    if not isinstance(blocks, nn.ModuleList):
        raise ConfigError(f"{container!r} is a {type(blocks).__name__}, not an nn.ModuleList")
    total = len(blocks)
    if not keep or sorted(set(keep)) != list(keep) or keep[0] < 0 or keep[-1] >= total:
        raise ConfigError(f"kept blocks {keep} must be ascending, unique, within 0..{total - 1}")
    new = nn.ModuleList([blocks[i] for i in keep])
    for j, block in enumerate(new):
        for module in block.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                setattr(module, "layer_idx", j)  # noqa: B010
    replace_module(model, container, new)
    config = getattr(model, "config", None)
    if config is not None:
        for key in LAYER_COUNT_KEYS:
            if getattr(config, key, None) == total:
                setattr(config, key, len(keep))
        for key in PER_LAYER_KEYS:
            value = getattr(config, key, None)
            if isinstance(value, list) and len(value) == total:
                setattr(config, key, [value[i] for i in keep])
    return new
