"""Where a model can be cut in two, and the two halves as runnable modules.

The model is traced once with ``torch.export`` (dynamic batch axis when the model allows it,
else the example's fixed shapes) into a flat graph of ATen operations; parameters are
``get_attr`` nodes, which either half may hold. Cut ``k`` puts the first ``k`` compute nodes
on the device and the rest on the server; the tensors *crossing* it are those made before it
and used after it (a model input still needed by the server crosses too). A cut is valid when
at most ``max_tensors`` tensors cross it and at most one of them is floating point: a ResNet
block boundary (one activation), a BERT encoder-layer boundary (hidden states + the attention
mask), never the inside of a residual block (identity + branch). Sizes (``sym_size`` of the
batch axis) never cross: the server reads them again from a crossing tensor's shape.

Cut ``0`` (everything on the server: the inputs cross) and cut ``len(compute)`` (everything on
the device: nothing crosses) are always valid. A cut that the same tensors cross as the one
before it (only sizes computed in between) is not listed again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from slimtorch.core.errors import UnsupportedModelError

_SIZE_OPS = (torch.ops.aten.sym_size.int,)


@dataclass
class Cut:
    """One valid cut: its position, a readable name and the tensors that cross it."""

    index: int  # compute nodes [0, index) run on the device
    name: str
    crossing: list[str]  # node names, in graph order
    shapes: list[list[int]] = field(default_factory=list)  # of the example (batch 1 allowed)
    dtypes: list[str] = field(default_factory=list)
    nbytes: int = 0  # bytes crossing per sample (batch 1), dense
    key: str = ""  # owner modules on both sides: finds the same cut in a compressed copy


@dataclass
class Traced:
    """A model as one flat graph: compute nodes in order, and what crosses where."""

    module: fx.GraphModule
    inputs: list[fx.Node]  # placeholders
    compute: list[fx.Node]  # nodes that are neither placeholders, get_attr nor the output
    outputs: list[fx.Node]  # tensors the model returns, in order
    dynamic: bool  # traced with a dynamic batch axis


def _owner(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    paths = [str(p) for p, _ in stack.values()]
    name = paths[-1] if paths else ""
    return name.removeprefix("L['self'].") or "(top)"


def _prune_side_effects(graph: fx.Graph) -> None:
    """Drop the asserts and guards torch.export leaves (nodes nobody uses)."""
    for node in reversed(list(graph.nodes)):
        if node.op in ("call_function", "call_module") and not node.users:
            graph.erase_node(node)


def trace(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> Traced:
    """``model`` as a flat ATen graph, batch axis dynamic when it can be."""
    errors = []
    for dynamic in (True, False):
        shapes, example = None, inputs
        if dynamic:  # a batch of 1 would be specialized: trace with the batch doubled
            batch = torch.export.Dim("batch", min=1, max=4096)
            shapes = tuple({0: batch} if t.dim() else None for t in inputs)
            example = tuple(torch.cat([t, t]) if t.dim() and len(t) == 1 else t for t in inputs)
        try:
            program = torch.export.export(model, example, dynamic_shapes=shapes, strict=False)
            break
        except Exception as exc:  # report both attempts below
            errors.append(f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
    else:
        raise UnsupportedModelError(
            f"cannot split {type(model).__name__}: torch.export cannot trace it"
            f" ({'; '.join(errors)}); make its forward traceable (no data-dependent Python"
            " control flow) or split it by hand"
        )
    gm = program.module()
    _prune_side_effects(gm.graph)
    nodes = list(gm.graph.nodes)
    out_node = nodes[-1]
    outs = _flat(out_node.args)
    return Traced(
        gm,
        [n for n in nodes if n.op == "placeholder"],
        [n for n in nodes if n.op not in ("placeholder", "get_attr", "output")],
        outs,
        dynamic,
    )


def _flat(args: Any) -> list[fx.Node]:
    found: list[fx.Node] = []
    fx.node.map_arg(args, found.append)
    return found


def _is_tensor(node: fx.Node) -> bool:
    return isinstance(node.meta.get("val"), torch.Tensor)


def crossing(traced: Traced, index: int) -> list[fx.Node] | None:
    """The tensors crossing cut ``index`` (None when a non-size value other than a tensor
    crosses: such a cut is not valid)."""
    if index >= len(traced.compute):
        return []
    before = set(traced.inputs) | set(traced.compute[:index])
    after = traced.compute[index:]
    used: dict[fx.Node, None] = {}
    for node in after:
        for arg in node.all_input_nodes:
            if arg in before:
                used[arg] = None
    for out in traced.outputs:  # an output made on the device reaches the server too
        if out in before:
            used[out] = None
    tensors = [n for n in used if _is_tensor(n)]
    others = [n for n in used if not _is_tensor(n)]
    if any(n.op != "call_function" or n.target not in _SIZE_OPS for n in others):
        return None
    order = {n: i for i, n in enumerate(traced.inputs + traced.compute)}
    return sorted(tensors, key=order.__getitem__)


def _describe(nodes: list[fx.Node]) -> tuple[list[list[int]], list[str], int]:
    shapes, dtypes, total = [], [], 0
    for n in nodes:
        val = n.meta["val"]
        shape = [int(s) if isinstance(s, int) else -1 for s in val.shape]
        shapes.append(shape)
        dtypes.append(str(val.dtype).removeprefix("torch."))
        count = 1
        for s in shape:
            count *= max(s, 1)
        total += count * val.element_size()
    return shapes, dtypes, total


def enumerate_cuts(traced: Traced, max_tensors: int = 2) -> list[Cut]:
    """Every valid cut, in order: 0 (all on the server), the interior ones, the last (all on
    the device). See the module docstring for the rule."""
    cuts: list[Cut] = []
    for index in range(len(traced.compute) + 1):
        nodes = crossing(traced, index)
        if nodes is None:
            continue
        if cuts and index < len(traced.compute) and [n.name for n in nodes] == cuts[-1].crossing:
            continue  # only sizes were computed since the last cut: the same cut
        floats = sum(1 for n in nodes if n.meta["val"].is_floating_point())
        trivial = index in (0, len(traced.compute))
        if not trivial and (len(nodes) > max_tensors or floats > 1 or not nodes):
            continue
        if index == 0:
            name = key = "input (all on the server)"
        elif trivial:
            name = key = "output (all on the device)"
        else:
            before, after = traced.compute[index - 1], traced.compute[index]
            name = f"after {_owner(before)} ({before.name}) / before {_owner(after)}"
            key = f"{_owner(before)}|{_owner(after)}"
            key += f"#{sum(1 for c in cuts if c.key.rpartition('#')[0] == key)}"
        shapes, dtypes, nbytes = _describe(nodes)
        cuts.append(Cut(index, name, [n.name for n in nodes], shapes, dtypes, nbytes, key))
    return cuts


def _symbolic_sizes(nodes: list[fx.Node]) -> dict[str, tuple[fx.Node, int]]:
    """``str(symbol) -> (tensor node, axis)`` for the symbolic dims of ``nodes``."""
    found: dict[str, tuple[fx.Node, int]] = {}
    for n in nodes:
        for axis, size in enumerate(n.meta["val"].shape):
            if not isinstance(size, int):
                found.setdefault(str(size), (n, axis))
    return found


def part(traced: Traced, start: int, stop: int) -> fx.GraphModule:
    """The compute nodes ``[start, stop)`` as a module: inputs are the tensors crossing
    ``start`` (the model's inputs for 0), outputs those crossing ``stop`` (the model's
    outputs at the end)."""
    ins = crossing(traced, start) if start else list(traced.inputs)
    outs = crossing(traced, stop) if stop < len(traced.compute) else traced.outputs
    if ins is None or outs is None:
        raise UnsupportedModelError(f"[{start}, {stop}) does not start and end at valid cuts")
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for n in ins:
        env[n] = graph.placeholder(n.name)
        env[n].meta = dict(n.meta)
    sizes = _symbolic_sizes(ins)
    body = set(traced.compute[start:stop])

    def lookup(arg: fx.Node) -> fx.Node:
        if arg in env:
            return env[arg]
        if arg.op == "get_attr":
            env[arg] = graph.node_copy(arg, lookup)
            return env[arg]
        if arg.op == "call_function" and arg.target in _SIZE_OPS and arg not in body:
            source = sizes.get(str(arg.meta.get("val")))
            if source is None:
                raise UnsupportedModelError(f"size {arg.name} cannot be read at cut {start}")
            env[arg] = graph.call_function(torch.ops.aten.sym_size.int, (env[source[0]], source[1]))
            return env[arg]
        raise UnsupportedModelError(f"{arg.name} is not available in part [{start}, {stop})")

    for n in traced.compute[start:stop]:
        env[n] = graph.node_copy(n, lookup)
    graph.output(tuple(lookup(o) for o in outs))
    graph.lint()
    return fx.GraphModule(traced.module, graph)


def _attr(gm: fx.GraphModule, node: Any) -> torch.Tensor | None:
    if node is None:
        return None
    value: Any = gm
    for name in str(node.target).split("."):
        value = getattr(value, name)
    return value.detach() if isinstance(value, torch.Tensor) else None


def batchnorm_as_affine(gm: fx.GraphModule) -> int:
    """Rewrite inference BatchNorm as ``x * scale + shift`` in place (the ONNX exporter would
    fold it into the convolution before it, and the low-bit weights with it); the count."""
    done = 0
    for node in list(gm.graph.nodes):
        if node.target is not torch.ops.aten.batch_norm.default or node.args[5]:
            continue
        x, w, b, mean, var = node.args[:5]
        eps = float(node.args[7])
        mean_t, var_t = _attr(gm, mean), _attr(gm, var)
        if mean_t is None or var_t is None:
            continue
        scale = torch.rsqrt(var_t + eps)
        weight, bias = _attr(gm, w), _attr(gm, b)
        scale = scale * weight if weight is not None else scale
        shift = (bias if bias is not None else 0.0) - mean_t * scale
        view = [-1] + [1] * (x.meta["val"].dim() - 2)
        gm.register_buffer(f"_bn_affine_{done}_scale", scale.reshape(view).contiguous())
        gm.register_buffer(f"_bn_affine_{done}_shift", shift.reshape(view).contiguous())
        with gm.graph.inserting_before(node):
            s = gm.graph.get_attr(f"_bn_affine_{done}_scale")
            t = gm.graph.get_attr(f"_bn_affine_{done}_shift")
            mul = gm.graph.call_function(torch.ops.aten.mul.Tensor, (x, s))
            add = gm.graph.call_function(torch.ops.aten.add.Tensor, (mul, t))
        add.meta = dict(node.meta)
        node.replace_all_uses_with(add)
        gm.graph.erase_node(node)
        done += 1
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return done
