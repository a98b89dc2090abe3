"""Slots: where a layer's channels sit in its tensors, and the surgery that keeps some of them.

Pure tensor helpers (:func:`slot_view`, :func:`take`, :func:`check_keep`, :func:`check_blocks`)
and :class:`SlotHandler`, the base of most layer handlers in :mod:`slimtorch.graph.handlers`:
each prunable dim is a list of :class:`Slot` (one tensor axis each), so importance views
(``weights``/``grads``) and surgery (``prune``) come from one description.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from slimtorch.core.errors import ConfigError, UnsupportedModelError, UserInputError
from slimtorch.formats.state import get_state

Layout = Literal["first", "last"]


# ---- pure tensor helpers --------------------------------------------------------------------


@dataclass(frozen=True)
class Slot:
    """Channels of a dim along ``axis`` of the tensor called ``name`` (dotted, relative to the
    module; a parameter or a buffer). The axis holds ``outer * n * inner`` entries laid out as
    ``[outer, n, inner]``: LSTM gates are ``outer=4``, attention heads ``inner=head_dim``."""

    name: str
    axis: int
    outer: int = 1
    inner: int = 1


def slot_view(t: Tensor, slot: Slot) -> tuple[Tensor, int]:
    """``(view, axis)`` of ``t`` such that channel ``c`` is ``view.select(axis, c)``."""
    axis = slot.axis % t.dim()
    n = t.shape[axis] // (slot.outer * slot.inner)
    split = [
        *([slot.outer] if slot.outer > 1 else []),
        n,
        *([slot.inner] if slot.inner > 1 else []),
    ]
    view = t.reshape(*t.shape[:axis], *split, *t.shape[axis + 1 :])
    return view, axis + (1 if slot.outer > 1 else 0)


def take(t: Tensor, slot: Slot, keep: Tensor) -> Tensor:
    """A new tensor holding channels ``keep`` (in that order) of ``t`` along ``slot``."""
    axis = slot.axis % t.dim()
    view, vaxis = slot_view(t, slot)
    picked = view.index_select(vaxis, keep.to(t.device))
    size = slot.outer * keep.numel() * slot.inner
    return picked.reshape(*t.shape[:axis], size, *t.shape[axis + 1 :]).contiguous()


def check_keep(keep: Tensor, n: int, what: str) -> Tensor:
    """``keep`` as int64 after checking it lists unique channels in ``[0, n)``, at least one."""
    if keep.dim() != 1 or keep.dtype.is_floating_point or keep.dtype == torch.bool:
        raise UserInputError(
            f"{what}: keep must be a 1-D integer tensor of channel indices, got {keep.dtype}"
            f" of shape {tuple(keep.shape)}; pass e.g. torch.tensor([0, 2, 3])"
        )
    if keep.numel() == 0:
        raise UserInputError(f"{what}: cannot remove all {n} channels; keep at least one")
    keep = keep.to(torch.int64)
    if int(keep.min()) < 0 or int(keep.max()) >= n:
        raise UserInputError(f"{what}: keep indices must lie in [0, {n}), got {keep.tolist()}")
    if keep.unique().numel() != keep.numel():
        raise UserInputError(f"{what}: keep lists a channel twice ({keep.tolist()}); dedupe it")
    return keep


def check_blocks(keep: Tensor, n: int, blocks: int, what: str) -> None:
    """Channels in ``blocks`` equal groups: each group keeps as many, in group order."""
    if blocks <= 1:
        return
    group = keep // (n // blocks)
    counts = torch.bincount(group, minlength=blocks)
    if bool((counts != counts[0]).any()) or int(counts[0]) == 0:
        raise UserInputError(
            f"{what}: its {n} channels form {blocks} groups of {n // blocks} that must each keep"
            f" the same number of channels, got {counts.tolist()} per group; choose the kept"
            f" channels per group (a multiple of {blocks} in total)"
        )
    if bool((group.diff() < 0).any()):
        raise UserInputError(
            f"{what}: kept channels must stay in group order (a permutation may only reorder"
            " channels within a group); sort keep by group"
        )


def num(module: nn.Module, name: str) -> int:
    """An integer attribute of a module (``in_features``, ``hidden_size``, ...)."""
    return int(getattr(module, name))


def _owner(module: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent, _, leaf = name.rpartition(".")
    return (module.get_submodule(parent) if parent else module), leaf


def refuse_compressed(module: nn.Module, names: Sequence[str]) -> None:
    """Raise when a tensor to be resized carries a WeightState or a parametrization."""
    for name in names:
        owner, leaf = _owner(module, name)
        state = get_state(owner, leaf)
        if state is not None:
            kind = "quantization" if state.quant is not None else "pruning mask"
            raise ConfigError(
                f"{type(module).__name__}.{name} carries a slimtorch {kind} state; structured"
                " pruning must come first: put the structured pruning stage before"
                " unstructured pruning / quantization / sharing in the recipe"
            )
        if parametrize.is_parametrized(owner, leaf):
            raise ConfigError(
                f"{type(module).__name__}.{name} is parametrized (weight norm, spectral norm,"
                " ...); remove the parametrization before structured pruning"
            )


def assign(module: nn.Module, name: str, value: Tensor) -> None:
    """Replace parameter or buffer ``name`` by ``value`` (parameters keep ``requires_grad``)."""
    owner, leaf = _owner(module, name)
    old = getattr(owner, leaf)
    if isinstance(old, nn.Parameter):
        setattr(owner, leaf, nn.Parameter(value, requires_grad=old.requires_grad))
    else:
        setattr(owner, leaf, value)


# ---- slot handlers --------------------------------------------------------------------------


class SlotHandler:
    """A handler whose dims are lists of :class:`Slot`; subclasses give dims, slots and resize."""

    layout: Layout = "last"
    is_coupled = False

    def dims(self, module: nn.Module) -> dict[str, int]:
        raise NotImplementedError

    def slots(self, module: nn.Module, dim: str) -> list[Slot]:
        raise NotImplementedError

    def resize(self, module: nn.Module, dim: str, n: int) -> None:
        raise NotImplementedError

    def coupled(self, module: nn.Module) -> bool:
        return self.is_coupled

    def tiles(self, module: nn.Module, dim: str) -> int:
        return 1

    def blocks(self, module: nn.Module, dim: str) -> int:
        return 1

    def present(self, module: nn.Module, dim: str) -> list[tuple[Slot, Tensor]]:
        """The slots of ``dim`` whose tensor exists (a missing bias is skipped), with it."""
        out = []
        for s in self.slots(module, dim):
            t = _tensor(module, s.name)
            if t is not None:
                out.append((s, t))
        return out

    def size(self, module: nn.Module, dim: str) -> int:
        sizes = self.dims(module)
        if dim not in sizes:
            raise UserInputError(
                f"{type(module).__name__} has no prunable dim {dim!r}; it has {sorted(sizes)}"
            )
        return sizes[dim]

    def learned(self, module: nn.Module, dim: str) -> list[tuple[Slot, Tensor]]:
        """The present weight slots of ``dim``: what importance reads. Biases and buffers
        (BatchNorm's running statistics) are cut with the channel but are not its importance,
        as in L1 filter pruning (Li et al., 2017) and Torch-Pruning's magnitude importance."""
        self.size(module, dim)
        return [(s, t) for s, t in self.present(module, dim) if _is_weight(module, s.name)]

    def weights(self, module: nn.Module, dim: str) -> list[tuple[Tensor, int]]:
        return [slot_view(t.detach(), s) for s, t in self.learned(module, dim)]

    def grads(self, module: nn.Module, dim: str) -> list[tuple[Tensor | None, int]]:
        out: list[tuple[Tensor | None, int]] = []
        for s, t in self.learned(module, dim):
            view, axis = slot_view(t.detach() if t.grad is None else t.grad, s)
            out.append((None if t.grad is None else view, axis))
        return out

    def prune(self, module: nn.Module, dim: str, keep: Tensor) -> nn.Module | None:
        n = self.size(module, dim)
        what = f"{type(module).__name__} dim {dim!r}"
        keep = check_keep(keep, n, what)
        check_blocks(keep, n, self.blocks(module, dim), what)
        present = self.present(module, dim)
        refuse_compressed(module, [s.name for s, _ in present])
        for s, _ in present:  # re-read: one tensor may have several slots (rows, columns)
            t = _tensor(module, s.name)
            assert t is not None
            assign(module, s.name, take(t.detach(), s, keep))
        self.resize(module, dim, keep.numel())
        return None


def _is_weight(module: nn.Module, name: str) -> bool:
    owner, leaf = _owner(module, name)
    return leaf not in owner._buffers and "bias" not in leaf  # bias, bias_ih_l0, in_proj_bias


def _tensor(module: nn.Module, name: str) -> Tensor | None:
    owner, leaf = _owner(module, name)
    t = getattr(owner, leaf, None)
    if t is None or isinstance(t, Tensor):
        return t
    raise UnsupportedModelError(
        f"{type(module).__name__}.{name} is a {type(t).__name__}, not a tensor; structured"
        " pruning needs the dense layer: run it before stages that replace layers"
    )
