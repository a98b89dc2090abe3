"""Structured-pruning handler for ``nn.Conv1d/2d/3d``, plain, depthwise and grouped.

- ``groups == 1``: dims ``in`` (weight axis 1) and ``out`` (weight axis 0, bias).
- depthwise (``groups == in == out``): *coupled*; channel c is filter c, only ``out``.
- other grouped convs: ``in`` and ``out`` with ``blocks() == groups``: every group keeps the same
  number of channels, in group order; ``in`` pruning gathers each group's kept local columns.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from slimtorch.graph.slots import (
    Layout,
    Slot,
    SlotHandler,
    assign,
    check_blocks,
    check_keep,
    num,
    refuse_compressed,
)


def _groups(module: nn.Module) -> int:
    return num(module, "groups")


def _weight(module: nn.Module) -> Tensor:
    w = module.weight
    assert isinstance(w, Tensor)
    return w


def is_depthwise(module: nn.Module) -> bool:
    g = _groups(module)
    return g > 1 and g == num(module, "in_channels") == num(module, "out_channels")


def grouped_in_view(w: Tensor, groups: int) -> Tensor:
    """``[in, out/groups, *k]``: row c holds the weights input channel c feeds (its group's
    filters). A copy, for importance only."""
    out, per_in = w.shape[0], w.shape[1]
    v = w.reshape(groups, out // groups, per_in, *w.shape[2:]).transpose(1, 2)
    return v.reshape(groups * per_in, out // groups, *w.shape[2:])


def take_grouped_in(w: Tensor, keep: Tensor, groups: int) -> Tensor:
    """Keep input channels ``keep`` (group-ordered, equal count per group) of a grouped conv
    weight ``[out, in/groups, *k]``: each group's filters keep that group's local columns."""
    out, per_in = w.shape[0], w.shape[1]
    per_out = out // groups
    local = (keep.to(w.device) % per_in).reshape(groups, -1)
    parts = [w[g * per_out : (g + 1) * per_out].index_select(1, local[g]) for g in range(groups)]
    return torch.cat(parts, 0).contiguous()


class ConvHandler(SlotHandler):
    layout: Layout = "first"

    def coupled(self, module: nn.Module) -> bool:
        return is_depthwise(module)

    def dims(self, module: nn.Module) -> dict[str, int]:
        if is_depthwise(module):
            return {"out": num(module, "out_channels")}
        return {"in": num(module, "in_channels"), "out": num(module, "out_channels")}

    def blocks(self, module: nn.Module, dim: str) -> int:
        return 1 if is_depthwise(module) else _groups(module)

    def slots(self, module: nn.Module, dim: str) -> list[Slot]:
        if dim == "out":
            return [Slot("weight", 0), Slot("bias", 0)]
        return [Slot("weight", 1)]

    def weights(self, module: nn.Module, dim: str) -> list[tuple[Tensor, int]]:
        if dim == "in" and _groups(module) > 1 and not is_depthwise(module):
            return [(grouped_in_view(_weight(module).detach(), _groups(module)), 0)]
        return super().weights(module, dim)

    def grads(self, module: nn.Module, dim: str) -> list[tuple[Tensor | None, int]]:
        if dim == "in" and _groups(module) > 1 and not is_depthwise(module):
            g = _weight(module).grad
            return [(grouped_in_view(g, _groups(module)) if g is not None else None, 0)]
        return super().grads(module, dim)

    def prune(self, module: nn.Module, dim: str, keep: Tensor) -> nn.Module | None:
        if dim != "in" or _groups(module) == 1:
            return super().prune(module, dim, keep)
        n = self.size(module, dim)
        what = f"{type(module).__name__} dim 'in'"
        keep = check_keep(keep, n, what)
        check_blocks(keep, n, _groups(module), what)
        refuse_compressed(module, ["weight"])
        w = take_grouped_in(_weight(module).detach(), keep, _groups(module))
        assign(module, "weight", w)
        setattr(module, "in_channels", keep.numel())  # noqa: B010
        return None

    def resize(self, module: nn.Module, dim: str, n: int) -> None:
        names = ("in_channels", "out_channels", "groups") if is_depthwise(module) else ()
        for name in names or (("out_channels",) if dim == "out" else ("in_channels",)):
            setattr(module, name, n)
