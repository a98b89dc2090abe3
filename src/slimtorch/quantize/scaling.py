"""Where per-channel scales can be folded in a block: the Linear layers that read one tensor and
the module that produced it, found generically (the search behind ``quantize.awq`` and
``quantize.smoothquant``, whose stages are in :mod:`slimtorch.quantize.stages.scaling`).

While the sequential pipeline runs a block on its calibration inputs, hooks note which tensor
each module produces and which tensor each targeted Linear reads. Linear layers reading the
*same* tensor form a group, and the module that produced it (a LayerNorm/RMSNorm, or a Linear
such as ``v_proj`` before ``o_proj``) is where the inverse scales go. A candidate fold is kept
only if folding random scales leaves the block's output unchanged (post-norm BERT's LayerNorm,
which also feeds the residual, is refused) — no per-architecture table.

Mixture-of-experts layers (:class:`~slimtorch.runtime.moe.UnfusedExperts`) get the groups of
AutoAWQ's Mixtral handling, found the same way (:func:`expert_groups`): the norm whose output
the router and the experts module read, with every expert's ``gate_proj`` and ``up_proj`` (and
the shared experts' Linears, if any) as the group and the router as a *rider* (its weight
columns multiplied by the scales, so its logits and the routing are unchanged; it is not
quantized); its input is the experts module's input, all tokens. Then per expert
``up_proj -> down_proj`` (the product ``act(gate(x)) * up(x)`` scales with ``up_proj``'s
rows), on that expert's routed rows. The Linears inside an expert are left out of the generic
search: each reads a gathered copy of the tokens or a product no module produces.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from slimtorch.quantize.awq import input_matrix
from slimtorch.quantize.smoothquant import fold_is_exact
from slimtorch.runtime.moe import ExpertMLP, UnfusedExperts


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
            if _reads(block, name, module, linears):
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


def _parent(block: nn.Module, name: str) -> nn.Module | None:
    return block.get_submodule(name.rpartition(".")[0]) if name else None


def _reads(block: nn.Module, name: str, module: nn.Module, linears: set[str]) -> bool:
    """Whether ``module``'s input is recorded: a targeted Linear outside the experts, an
    experts module, or a router (a module beside an experts module with a 2-D weight)."""
    parent = _parent(block, name)
    if isinstance(parent, ExpertMLP) or not name:
        return False
    if name in linears or isinstance(module, UnfusedExperts):
        return True
    weight = module._parameters.get("weight")
    beside = parent is not None and any(isinstance(m, UnfusedExperts) for m in parent.children())
    return beside and weight is not None and weight.dim() == 2


def _runner(block: nn.Module, producers: _Producers) -> Callable[[], torch.Tensor]:
    assert producers.first is not None
    args, kwargs = producers.first

    def run() -> torch.Tensor:
        with torch.no_grad():
            out = block(*args, **kwargs)
        # a tuple, or a transformers ModelOutput (a one-block model: the whole LM's logits)
        return out[0] if isinstance(out, (tuple, list)) or hasattr(out, "to_tuple") else out

    return run


def scale_groups(
    block: nn.Module, layers: dict[str, nn.Module], producers: _Producers
) -> list[tuple[str, list[str]]]:
    """(producer, linears reading its output) pairs whose fold leaves the block unchanged
    (those feeding a mixture-of-experts layer are :func:`expert_groups`')."""
    if producers.first is None:
        return []
    run = _runner(block, producers)
    groups = []
    readers = producers.readers()
    for prev, names in readers.items():
        if any(n not in layers for n in names):  # an experts module or a router reads it
            continue
        mods = [layers[n] for n in names]
        if fold_is_exact(block.get_submodule(prev), mods, run):
            groups.append((prev, names))
    # the rest (pointer matches can be false: a freed output's memory reused) may read a product
    taken = {n for _, names in groups for n in names}
    return groups + product_groups(block, [n for n in layers if n not in taken], run)


def product_groups(
    block: nn.Module, unread: list[str], run: Callable[[], torch.Tensor]
) -> list[tuple[str, list[str]]]:
    """Groups of one targeted Linear whose input no module produced as it is (among ``unread``): a
    product such as SwiGLU's ``act(gate_proj(x)) * up_proj(x)`` or attention's ``softmax(q k^T)
    v``. Its producer is the first earlier sibling Linear with as many outputs as it has inputs
    whose fold leaves the block unchanged: ``up_proj -> down_proj`` (``gate_proj`` fails: the
    activation is not linear), and ``v_proj -> o_proj`` where every query head has its own
    key/value head (with grouped-query attention the widths differ), as AutoAWQ's tables say."""
    groups = []
    for name in unread:
        parent_name, _, leaf = name.rpartition(".")
        parent = block.get_submodule(parent_name) if parent_name else block
        if isinstance(parent, ExpertMLP):
            continue  # the experts' up -> down groups are expert_groups'
        linear = block.get_submodule(name)
        width = input_matrix(linear).shape[1]
        for child, module in parent.named_children():
            if child == leaf:
                break
            out = module.weight.shape[0] if isinstance(module, nn.Linear) else None
            if out == width and fold_is_exact(module, [linear], run):
                groups.append((f"{parent_name}.{child}" if parent_name else child, [name]))
                break
    return groups


@dataclass(frozen=True)
class ExpertGroup:
    """A scaling group of a mixture-of-experts layer (module docstring). ``names``: the
    targeted Linears (searched and quantized); ``riders``: modules that read ``prev``'s output
    too and are scaled, not quantized (the router, experts left out of the targets);
    ``source``: the module whose recorded input is the group's input."""

    prev: str
    names: list[str]
    riders: list[str]
    source: str


def expert_groups(
    block: nn.Module, layers: dict[str, nn.Module], producers: _Producers
) -> list[ExpertGroup]:
    """The scaling groups of the mixture-of-experts layers of ``block``: first each one's norm
    group (kept only if folding leaves the block unchanged), then every expert's
    ``up_proj -> down_proj`` pair (kept if folding leaves the expert unchanged)."""
    if producers.first is None:
        return []
    run = _runner(block, producers)
    found = []
    for prev, readers in producers.readers().items():
        moe = [n for n in readers if isinstance(block.get_submodule(n), UnfusedExperts)]
        if not moe:
            continue
        names: list[str] = []
        riders: list[str] = []
        for reader in readers:
            if reader in moe:
                experts = block.get_submodule(reader).experts()  # type: ignore[operator]
                for i in range(len(experts)):
                    for leaf in ("gate_proj", "up_proj"):
                        full = f"{reader}.{i}.{leaf}"
                        (names if full in layers else riders).append(full)
            else:
                (names if reader in layers else riders).append(reader)
        mods = [block.get_submodule(n) for n in names + riders]
        if names and fold_is_exact(block.get_submodule(prev), mods, run):
            found.append(ExpertGroup(prev, names, riders, moe[0]))
    for name, module in block.named_modules():
        if not isinstance(module, UnfusedExperts):
            continue
        for i, expert in enumerate(module.experts()):
            down = f"{name}.{i}.down_proj"
            if down in layers and fold_is_exact(expert.up_proj, [expert.down_proj], _on(expert)):
                found.append(ExpertGroup(f"{name}.{i}.up_proj", [down], [], down))
    return found


def _on(expert: ExpertMLP) -> Callable[[], torch.Tensor]:
    """``expert`` run on a few random tokens (to check a fold inside it)."""
    w = expert.up_proj.weight
    z = torch.randn(4, w.shape[1], generator=torch.Generator().manual_seed(0))
    z = z.to(w.device, w.dtype)

    def run() -> torch.Tensor:
        with torch.no_grad():
            return expert(z)  # type: ignore[no-any-return]

    return run
