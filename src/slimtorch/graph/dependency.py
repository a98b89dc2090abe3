"""Dependency graph of coupled channels: which dims of which layers must be pruned together.

The model is traced with ``torch.export`` (non-strict, so Hugging Face models trace too). Every
op inside a module that has a layer handler (:mod:`slimtorch.graph.handlers`) is collapsed into
that module (the outermost handled module wins), so a layer is a black box with ``in``/``out``
dims. Channel *spaces* start at the ``out`` dim (and internal dims such as attention heads) of
each layer and are followed through the ops between layers: elementwise ops (a residual ``add``
unites the spaces of its operands), pooling and reductions over other axes, ``flatten`` (a
channel becomes a block of features), ``cat`` (spaces sit at offsets), ``getitem``. Where a
space reaches an op we cannot follow (a reshape that splits channels, a reduction over them, a
raw parameter, the model's output), it is *frozen*: never pruned, with the reason kept.

A :class:`Group` is a union of spaces: ``members`` say, for each layer dim, at which positions
of that dim channel ``c`` lives (``index[c]``: one position, several for a bidirectional RNN's
output or a flattened feature map).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from slimtorch.core.errors import UnsupportedModelError
from slimtorch.graph import ops
from slimtorch.graph.handlers import LayerHandler, handler_for
from slimtorch.graph.hf_attention import register_attention_handlers
from slimtorch.graph.ops import Track

log = logging.getLogger(__name__)


@dataclass
class Member:
    """Channel ``c`` of the group sits at positions ``index[c]`` of ``module``'s ``dim``."""

    module: str
    dim: str
    index: torch.Tensor  # int64 [C, k]


@dataclass
class Group:
    """Channels that are pruned together."""

    id: int
    size: int
    members: list[Member] = field(default_factory=list)
    blocks: int = 1
    frozen: str | None = None  # why this group cannot be pruned

    @property
    def modules(self) -> list[str]:
        return sorted({m.module for m in self.members})

    def describe(self) -> str:
        dims = ", ".join(f"{m.module}.{m.dim}" for m in self.members[:6])
        more = f" (+{len(self.members) - 6})" if len(self.members) > 6 else ""
        return f"group {self.id} [{self.size} channels]: {dims}{more}"


@dataclass
class DependencyGraph:
    groups: list[Group]

    @property
    def prunable(self) -> list[Group]:
        return [g for g in self.groups if g.frozen is None]

    @property
    def frozen(self) -> list[Group]:
        return [g for g in self.groups if g.frozen is not None]


class _Spaces:
    """Union-find over channel spaces, with members and freeze reasons."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.size: list[int] = []
        self.members: list[list[Member]] = []
        self.frozen: list[str | None] = []
        self.blocks: list[int] = []

    def new(self, size: int) -> int:
        self.parent.append(len(self.parent))
        self.size.append(size)
        self.members.append([])
        self.frozen.append(None)
        self.blocks.append(1)
        return len(self.parent) - 1

    def find(self, s: int) -> int:
        while self.parent[s] != s:
            self.parent[s] = self.parent[self.parent[s]]
            s = self.parent[s]
        return s

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if self.size[ra] != self.size[rb]:
            self.freeze(ra, f"spaces of {self.size[ra]} and {self.size[rb]} channels meet")
            self.freeze(rb, f"spaces of {self.size[ra]} and {self.size[rb]} channels meet")
        self.parent[rb] = ra
        self.members[ra] += self.members[rb]
        self.frozen[ra] = self.frozen[ra] or self.frozen[rb]
        self.blocks[ra] = max(self.blocks[ra], self.blocks[rb])

    def freeze(self, s: int, why: str) -> None:
        r = self.find(s)
        if self.frozen[r] is None:
            self.frozen[r] = why

    def add(self, s: int, member: Member, blocks: int = 1) -> None:
        r = self.find(s)
        self.members[r].append(member)
        if blocks > 1:
            if self.blocks[r] > 1 and max(blocks, self.blocks[r]) % min(blocks, self.blocks[r]):
                self.freeze(r, f"block constraints {blocks} and {self.blocks[r]} conflict")
            self.blocks[r] = max(self.blocks[r], blocks)


def trace(model: nn.Module, example_inputs: Sequence[Any]) -> torch.fx.GraphModule:
    """``torch.export`` the model (non-strict); a failure names the operator or construct."""
    was_training = model.training
    config: Any = getattr(model, "config", None)
    use_cache = getattr(config, "use_cache", None)
    if use_cache:
        config.use_cache = False  # a KV cache in the output cannot be traced
    model.eval()
    try:
        with torch.no_grad():
            program = torch.export.export(model, tuple(example_inputs), strict=False)
    except Exception as exc:
        raise UnsupportedModelError(
            f"cannot trace {type(model).__name__} for structured pruning:"
            f" {type(exc).__name__}: {str(exc).splitlines()[0][:300]}. Register a layer handler"
            " (slimtorch.graph.handlers.register_handler) for the module that contains it so"
            " that it is treated as one layer, or prune that part with `ignore`"
        ) from exc
    finally:
        model.train(was_training)
        if use_cache:
            config.use_cache = use_cache
    return program.graph_module


def _leaf_of(node: torch.fx.Node, leaves: dict[str, LayerHandler]) -> str | None:
    """The outermost module with a layer handler that ``node`` runs in, if any."""
    for path, _cls in (node.meta.get("nn_module_stack") or {}).values():
        name = _module_path(path)
        if name in leaves:
            return name
    return None


def _module_path(path: str) -> str:
    """nn_module_stack paths are dotted names, sometimes as ``L['self'].layer1[0]``."""
    if not path.startswith("L["):
        return path
    out = path.replace("L['self']", "").replace("[", ".").replace("]", "").replace("'", "")
    return out.strip(".")


def build_graph(model: nn.Module, example_inputs: Sequence[Any]) -> DependencyGraph:
    """Groups of coupled channels of ``model``, traced on ``example_inputs``."""
    register_attention_handlers(model)
    gm = trace(model, example_inputs)
    return _Builder(model, gm).run()


class _Builder:
    def __init__(self, model: nn.Module, gm: torch.fx.GraphModule) -> None:
        self.model = model
        self.gm = gm
        self.spaces = _Spaces()
        self.tracks: dict[torch.fx.Node, Track] = {}
        self.leaves: dict[str, LayerHandler] = {}
        for name, module in model.named_modules():
            handler = handler_for(module) if name else None
            if handler is not None:
                self.leaves[name] = handler
        self.module_out: dict[str, int] = {}
        self.internal_done: set[str] = set()
        self.leaf_tracks: dict[str, Track] = {}

    def run(self) -> DependencyGraph:
        nodes = [n for n in self.gm.graph.nodes if n.op == "call_function"]
        region = {n: _leaf_of(n, self.leaves) for n in nodes}
        for node in self.gm.graph.nodes:
            if node.op == "output":
                self._output(node)
            elif node.op == "call_function":
                leaf = region[node]
                if leaf is None:
                    self._op(node)
                else:
                    self._in_leaf(node, leaf, region)
        self._tie_embeddings()
        return self._groups()

    # -- leaves ------------------------------------------------------------------------------

    def _in_leaf(self, node: torch.fx.Node, leaf: str, region: dict[Any, str | None]) -> None:
        module = self.model.get_submodule(leaf)
        handler = self.leaves[leaf]
        dims = handler.dims(module)
        self._internal(leaf, module, handler, dims)
        for arg in _tensor_args(node):
            if region.get(arg) == leaf or arg not in self.tracks:
                continue
            self._enter(leaf, module, handler, dims, self.tracks[arg])
        if _is_tensor(node) and any(region.get(u) != leaf for u in node.users):
            self._exit(node, leaf, module, handler, dims)

    def _internal(self, leaf: str, module: nn.Module, handler: LayerHandler, dims: dict) -> None:
        if leaf in self.internal_done:
            return
        self.internal_done.add(leaf)
        for dim, size in dims.items():
            if dim in ("in", "out"):
                continue
            s = self.spaces.new(size)
            self.spaces.add(s, Member(leaf, dim, _identity(size)), handler.blocks(module, dim))

    def _enter(
        self, leaf: str, module: nn.Module, handler: LayerHandler, dims: dict, t: Track
    ) -> None:
        coupled = handler.coupled(module)
        dim = "out" if coupled else "in"
        if coupled and not dims:
            self.leaf_tracks.setdefault(leaf, t)
            return
        axis = 1 if handler.layout == "first" else t.rank - 1
        if dim not in dims or t.axis != axis or dims[dim] != t.length:
            why = f"{leaf} ({type(module).__name__}) cannot prune its input channels"
            if dim in dims and dims[dim] != t.length:
                why = f"{leaf}: input has {t.length} channels, layer expects {dims[dim]}"
            for s, _ in t.segs:
                self.spaces.freeze(s, why)
            return
        blocks = handler.blocks(module, dim)
        for s, index in t.segs:
            self.spaces.add(s, Member(leaf, dim, index), blocks)
        if coupled:
            self.leaf_tracks[leaf] = t

    def _exit(
        self,
        node: torch.fx.Node,
        leaf: str,
        module: nn.Module,
        handler: LayerHandler,
        dims: dict,
    ) -> None:
        shape = _shape(node)
        if shape is None:
            return
        coupled = handler.coupled(module)
        if coupled:
            t = self.leaf_tracks.get(leaf)
            if t is not None and t.rank == len(shape) and shape[t.axis] == t.length:
                self.tracks[node] = t
            return
        if "out" not in dims or not shape:
            return
        axis = 1 if handler.layout == "first" else len(shape) - 1
        if axis >= len(shape):
            return
        units = dims["out"]
        length = shape[axis]
        if length % units:
            return
        if leaf not in self.module_out:
            s = self.spaces.new(units)
            self.spaces.add(s, Member(leaf, "out", _identity(units)), handler.blocks(module, "out"))
            self.module_out[leaf] = s
        tiles = length // units
        index = (torch.arange(units)[:, None] + units * torch.arange(tiles)[None, :]).long()
        self.tracks[node] = Track(len(shape), axis, length, ((self.module_out[leaf], index),))

    # -- ops between layers ------------------------------------------------------------------

    def _op(self, node: torch.fx.Node) -> None:
        tracked = [a for a in _tensor_args(node) if a in self.tracks]
        if not tracked:
            return
        inputs = {a: self.tracks[a] for a in tracked}
        result = ops.propagate(node, inputs, self.spaces.union)
        if isinstance(result, str):
            for t in inputs.values():
                for s, _ in t.segs:
                    self.spaces.freeze(s, result)
            return
        if result is not None:
            self.tracks[node] = result

    def _output(self, node: torch.fx.Node) -> None:
        for arg in _flat_args(node.args):
            t = self.tracks.get(arg) if isinstance(arg, torch.fx.Node) else None
            if t is not None:
                for s, _ in t.segs:
                    self.spaces.freeze(s, "reaches the model's output")

    def _tie_embeddings(self) -> None:
        """An Embedding whose weight is also a Linear's weight (a tied LM head)."""
        owners: dict[int, list[tuple[str, nn.Module]]] = {}
        for name in self.leaves:
            module = self.model.get_submodule(name)
            weight = getattr(module, "weight", None)
            if isinstance(weight, torch.Tensor):
                owners.setdefault(id(weight), []).append((name, module))
        for mods in owners.values():
            if len(mods) < 2:
                continue
            spaces = self._spaces_of({n for n, _ in mods})
            kinds = sorted(type(m).__name__ for _, m in mods)
            if kinds != ["Embedding", "Linear"] or len(spaces) < 2:
                for s in spaces:
                    self.spaces.freeze(s, f"weight shared by {[n for n, _ in mods]}")
                continue
            first, *rest = spaces
            for s in rest:
                self.spaces.union(first, s)

    def _spaces_of(self, names: set[str]) -> list[int]:
        found = []
        for s in range(len(self.spaces.parent)):
            if self.spaces.find(s) == s and any(
                m.module in names and m.dim in ("in", "out") for m in self.spaces.members[s]
            ):
                found.append(s)
        return found

    def _groups(self) -> DependencyGraph:
        groups: list[Group] = []
        for s in range(len(self.spaces.parent)):
            if self.spaces.find(s) != s or not self.spaces.members[s]:
                continue
            members = _merge_members(self.spaces.members[s])
            group = Group(len(groups), self.spaces.size[s], members, self.spaces.blocks[s])
            group.frozen = self.spaces.frozen[s]
            if group.frozen is None and group.size % group.blocks:
                group.frozen = f"{group.size} channels do not split into {group.blocks} blocks"
            groups.append(group)
        return DependencyGraph(groups)


def _merge_members(members: list[Member]) -> list[Member]:
    """One member per (module, dim); a layer reached twice by one space keeps one entry."""
    seen: dict[tuple[str, str], Member] = {}
    for m in members:
        key = (m.module, m.dim)
        if key not in seen:
            seen[key] = m
        elif not torch.equal(seen[key].index, m.index):
            seen[key] = Member(m.module, m.dim, torch.cat([seen[key].index, m.index], dim=1))
    return list(seen.values())


def _identity(size: int) -> torch.Tensor:
    return torch.arange(size, dtype=torch.int64)[:, None]


def _shape(node: torch.fx.Node) -> tuple[int, ...] | None:
    val = node.meta.get("val")
    return tuple(int(d) for d in val.shape) if isinstance(val, torch.Tensor) else None


def _is_tensor(node: torch.fx.Node) -> bool:
    return isinstance(node.meta.get("val"), torch.Tensor)


def _flat_args(args: Any) -> list[Any]:
    out: list[Any] = []
    for a in args if isinstance(args, (list, tuple)) else [args]:
        if isinstance(a, (list, tuple)):
            out += _flat_args(a)
        elif isinstance(a, dict):
            out += _flat_args(list(a.values()))
        else:
            out.append(a)
    return out


def _tensor_args(node: torch.fx.Node) -> list[torch.fx.Node]:
    args = _flat_args(list(node.args) + list(node.kwargs.values()))
    return [a for a in args if isinstance(a, torch.fx.Node)]
