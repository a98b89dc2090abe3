"""Where per-channel scales can be folded in a block: the Linear layers that read one tensor and
the module that produced it, found generically (the search behind ``quantize.awq`` and
``quantize.smoothquant``, whose stages are in :mod:`slimtorch.quantize.stages.scaling`).

While the sequential pipeline runs a block on its calibration inputs, hooks note which tensor
each module produces and which tensor each targeted Linear reads. Linear layers reading the
*same* tensor form a group, and the module that produced it (a LayerNorm/RMSNorm, or a Linear
such as ``v_proj`` before ``o_proj``) is where the inverse scales go. A candidate fold is kept
only if folding random scales leaves the block's output unchanged (post-norm BERT's LayerNorm,
which also feeds the residual, is refused) — no per-architecture table.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from slimtorch.quantize.smoothquant import fold_is_exact


class _Producers:
    """Hooks on every module of a block during its first call: the order in which modules
    produce tensors and targeted Linear layers read them, and that call's inputs."""

    def __init__(self, block: nn.Module, linears: set[str]) -> None:
        self.events: list[tuple[str, str, int]] = []  # ("out" | "in", module, data_ptr)
        self.first: tuple[tuple[Any, ...], dict[str, Any]] | None = None
        self.active = False
        self.handles = [
            block.register_forward_pre_hook(self._begin, with_kwargs=True),
            block.register_forward_hook(self._end),
        ]
        for name, module in block.named_modules():
            if name:
                self.handles.append(module.register_forward_hook(self._out(name)))
            if name in linears:
                self.handles.append(module.register_forward_pre_hook(self._in(name)))

    def _begin(self, _m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.active = self.first is None
        if self.active:
            self.first = (args, kwargs)

    def _end(self, *_: Any) -> None:
        self.active = False

    def _out(self, name: str) -> Callable[..., None]:
        def hook(_m: nn.Module, _i: Any, out: Any) -> None:
            if self.active and isinstance(out, torch.Tensor):
                self.events.append(("out", name, out.data_ptr()))

        return hook

    def _in(self, name: str) -> Callable[..., None]:
        def hook(_m: nn.Module, args: tuple[Any, ...]) -> None:
            if self.active and args and isinstance(args[0], torch.Tensor):
                self.events.append(("in", name, args[0].data_ptr()))

        return hook

    def readers(self) -> dict[str, list[str]]:
        """Producer -> the targeted Linear layers that read its latest output."""
        latest: dict[int, str] = {}
        found: dict[str, list[str]] = {}
        for kind, name, ptr in self.events:
            if kind == "out":
                latest[ptr] = name
            elif ptr in latest and latest[ptr] != name:
                found.setdefault(latest[ptr], []).append(name)
        return found

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def scale_groups(
    block: nn.Module, layers: dict[str, nn.Module], producers: _Producers
) -> list[tuple[str, list[str]]]:
    """(producer, linears reading its output) pairs whose fold leaves the block unchanged."""
    if producers.first is None:
        return []
    args, kwargs = producers.first

    def run() -> torch.Tensor:
        with torch.no_grad():
            out = block(*args, **kwargs)
        return out[0] if isinstance(out, (tuple, list)) else out

    groups = []
    for prev, names in producers.readers().items():
        mods = [layers[n] for n in names]
        if fold_is_exact(block.get_submodule(prev), mods, run):
            groups.append((prev, names))
    return groups
