"""How channel spaces travel through the ops between layers (for :mod:`graph.dependency`).

A :class:`Track` says where the channels of one or more spaces sit along one axis of a traced
value: ``segs`` pairs a space with ``index [C, k]``, the positions of its channel ``c`` along
``axis`` (``k > 1`` after ``flatten`` or for a bidirectional RNN). :func:`propagate` returns the
output's Track, ``None`` when the output carries no channels, or a string: the reason the input
spaces must be frozen.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

Union = Callable[[int, int], None]


@dataclass(frozen=True)
class Track:
    rank: int
    axis: int
    length: int
    segs: tuple[tuple[int, torch.Tensor], ...]

    def moved(self, rank: int, axis: int, length: int | None = None) -> Track:
        return Track(rank, axis, self.length if length is None else length, self.segs)


UNARY = {
    "relu", "relu_", "gelu", "silu", "sigmoid", "tanh", "hardtanh", "hardtanh_", "hardswish",
    "hardsigmoid", "leaky_relu", "elu", "selu", "celu", "softplus", "mish", "relu6", "dropout",
    "feature_dropout", "alpha_dropout", "native_dropout", "clone", "contiguous", "_to_copy", "to",
    "detach", "alias", "neg", "abs", "exp", "log", "sqrt", "rsqrt", "erf", "square", "pow",
    "clamp", "clamp_min", "clamp_max", "reciprocal", "lift_fresh_copy", "type_as", "sin", "cos",
    "expand", "expand_as", "dropout_", "silu_", "gelu_", "sigmoid_", "tanh_", "zeros_like",
    "ones_like", "empty_like", "log_sigmoid", "logit", "sign", "floor", "ceil", "round",
}  # fmt: skip
BINARY = {
    "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "maximum", "minimum", "where",
    "rsub", "true_divide", "floor_divide", "fmod", "remainder", "eq", "ne", "lt", "le", "gt",
    "ge", "logical_and", "logical_or", "masked_fill", "addcmul", "lerp", "copy", "copy_",
}  # fmt: skip
SPATIAL = {
    "max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d",
    "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d", "adaptive_max_pool1d",
    "adaptive_max_pool2d", "adaptive_max_pool3d", "max_pool2d_with_indices", "upsample_nearest2d",
    "upsample_bilinear2d", "constant_pad_nd", "pad", "reflection_pad2d", "replication_pad2d",
    "_adaptive_avg_pool2d", "pixel_shuffle_free",
}  # fmt: skip
REDUCE = {"mean", "sum", "amax", "amin", "std", "var", "prod", "logsumexp", "norm", "max", "min"}
NO_TENSOR = {"sym_size", "size", "dim", "numel", "_assert_tensor_metadata", "sym_numel"}


def _a(node: torch.fx.Node) -> list[Any]:
    return list(node.args)


def op_name(target: Any) -> str:
    packet = getattr(target, "overloadpacket", None)
    if packet is not None:
        return str(packet.__name__)
    return str(getattr(target, "__name__", target))


def _shape(node: torch.fx.Node) -> tuple[int, ...] | None:
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        return tuple(int(d) for d in val.shape)
    if isinstance(val, (tuple, list)) and val and isinstance(val[0], torch.Tensor):
        return tuple(int(d) for d in val[0].shape)
    return None


def _norm(dim: int, rank: int) -> int:
    return dim + rank if dim < 0 else dim


def propagate(
    node: torch.fx.Node, inputs: dict[torch.fx.Node, Track], union: Union
) -> Track | str | None:
    """Track of ``node``'s output given the Tracks of its tracked inputs."""
    name = op_name(node.target)
    out = _shape(node)
    first = _a(node)[0] if _a(node) else None
    src = inputs.get(first) if isinstance(first, torch.fx.Node) else None
    if name in NO_TENSOR:
        return None
    if name == "cat":
        return propagate_cat(node, inputs, union)
    if name == "getitem":
        if src is not None and _a(node)[1] == 0 and out is not None and len(out) == src.rank:
            return src
        return f"indexing a tuple that carries channels ({node.name})"
    if out is None:
        return f"{name} ({node.name}) returns no tensor we can follow"
    if name in BINARY or (name in UNARY and len(inputs) > 1):
        return _elementwise(node, inputs, out, union)
    if src is None:
        return f"{name} ({node.name}) mixes channels from a non-first argument"
    if name in UNARY or name in SPATIAL:
        if len(out) == src.rank and out[src.axis] == src.length:
            return src
        return f"{name} ({node.name}) changes the channel axis"
    rule = _RULES.get(name)
    if rule is None:
        return f"op {name} ({node.name}) is not understood by the dependency graph"
    return rule(node, src, out, union)


def _elementwise(
    node: torch.fx.Node, inputs: dict[torch.fx.Node, Track], out: tuple[int, ...], union: Union
) -> Track | str:
    rank = len(out)
    tracks = []
    for arg in _a(node):
        if not isinstance(arg, torch.fx.Node):
            continue
        shape = _shape(arg)
        if shape is None:
            continue
        t = inputs.get(arg)
        if t is not None:
            tracks.append(t.moved(rank, t.axis + rank - t.rank))
    if not tracks:
        return f"{node.name}: no tracked operand"
    ref = tracks[0]
    for arg in _a(node):
        if isinstance(arg, torch.fx.Node) and arg not in inputs:
            shape = _shape(arg)
            pos = ref.axis - (rank - len(shape)) if shape is not None else -1
            if shape is not None and 0 <= pos < len(shape) and shape[pos] != 1:
                return f"{op_name(node.target)} ({node.name}) with a tensor that is not pruned"
    for t in tracks[1:]:
        if t.axis != ref.axis or len(t.segs) != len(ref.segs):
            return f"{node.name}: operands carry channels differently"
        for (sa, ia), (sb, ib) in zip(ref.segs, t.segs, strict=True):
            if ia.shape != ib.shape or not torch.equal(ia, ib):
                return f"{node.name}: operands carry channels at different positions"
            union(sa, sb)
    if out[ref.axis] != ref.length:
        return f"{node.name}: broadcast changes the channel axis"
    return ref


def _dims_arg(node: torch.fx.Node, index: int, rank: int) -> list[int] | None:
    dims: Any = _a(node)[index] if len(_a(node)) > index else node.kwargs.get("dim")
    if dims is None:
        return None
    if isinstance(dims, int):
        dims = [dims]
    return [_norm(int(d), rank) for d in dims]


def _reduce(node: torch.fx.Node, src: Track, out: tuple[int, ...], union: Union) -> Track | str:
    dims = _dims_arg(node, 1, src.rank)
    if dims is None or src.axis in dims:
        return f"{op_name(node.target)} ({node.name}) reduces over channels"
    if len(out) == src.rank:
        return src
    return src.moved(len(out), src.axis - sum(d < src.axis for d in dims))


def _softmax(node: torch.fx.Node, src: Track, out: tuple[int, ...], union: Union) -> Track | str:
    if _norm(int(_a(node)[1]), src.rank) == src.axis:
        return f"softmax over channels ({node.name})"
    return src


def _merge(src: Track, start: int, end: int, shape: tuple[int, ...], rank: int) -> Track:
    """Dims ``start..end`` (containing the channel axis) become one."""
    outer = math.prod(shape[start : src.axis])
    inner = math.prod(shape[src.axis + 1 : end + 1])
    segs = []
    for s, index in src.segs:
        base = index[:, None, :, None] * inner + torch.arange(inner)[None, None, None, :]
        base = base + (torch.arange(outer) * src.length * inner)[None, :, None, None]
        segs.append((s, base.reshape(index.shape[0], -1)))
    return Track(rank, start, src.length * outer * inner, tuple(segs))


def _flatten(node: torch.fx.Node, src: Track, out: tuple[int, ...], union: Union) -> Track | str:
    start = _norm(int(_a(node)[1]) if len(_a(node)) > 1 else 0, src.rank)
    end = _norm(int(_a(node)[2]) if len(_a(node)) > 2 else -1, src.rank)
    shape = _shape(_a(node)[0])
    assert shape is not None
    if start <= src.axis <= end:
        return _merge(src, start, end, shape, len(out))
    if src.axis > end:
        return src.moved(len(out), src.axis - (end - start))
    return src.moved(len(out), src.axis)


def _view(node: torch.fx.Node, src: Track, out: tuple[int, ...], union: Union) -> Track | str:
    shape = _shape(_a(node)[0])
    assert shape is not None
    cin = [math.prod(shape[:i]) for i in range(len(shape) + 1)]
    cout = [math.prod(out[:i]) for i in range(len(out) + 1)]
    starts = [i for i in range(src.axis + 1) if cin[i] in cout]
    ends = [i for i in range(src.axis + 1, len(shape) + 1) if cin[i] in cout]
    if not starts or not ends:
        return f"reshape ({node.name}) splits channels"
    a0, a1 = starts[-1], ends[0] - 1
    js = [j for j in range(len(out)) if cout[j] == cin[a0] and cout[j + 1] == cin[a1 + 1]]
    if not js:
        return f"reshape ({node.name}) splits channels"
    if a0 == a1 == src.axis:
        return src.moved(len(out), js[-1])
    return _merge(src, a0, a1, shape, len(out)).moved(len(out), js[-1])


def _unsqueeze(node: torch.fx.Node, src: Track, out: tuple[int, ...], union: Union) -> Track:
    d = _norm(int(_a(node)[1]), len(out))
    return src.moved(len(out), src.axis + (d <= src.axis))


def _squeeze(node: torch.fx.Node, src: Track, out: tuple[int, ...], union: Union) -> Track | str:
    shape = _shape(_a(node)[0])
    assert shape is not None
    dims = _dims_arg(node, 1, src.rank)
    dropped = [i for i in range(src.rank) if shape[i] == 1 and (dims is None or i in dims)]
    if src.axis in dropped:
        return f"squeeze ({node.name}) drops the channel axis"
    return src.moved(len(out), src.axis - sum(d < src.axis for d in dropped))


def _permute(node: torch.fx.Node, src: Track, out: tuple[int, ...], union: Union) -> Track:
    dims = [_norm(int(d), src.rank) for d in _a(node)[1]]
    return src.moved(len(out), dims.index(src.axis))


def _transpose(node: torch.fx.Node, src: Track, out: tuple[int, ...], union: Union) -> Track:
    if op_name(node.target) in ("t", "numpy_T"):
        a, b = 0, 1
    else:
        a, b = (_norm(int(x), src.rank) for x in _a(node)[1:3])
    axis = b if src.axis == a else a if src.axis == b else src.axis
    return src.moved(len(out), axis)


def _slice(node: torch.fx.Node, src: Track, out: tuple[int, ...], union: Union) -> Track | str:
    dim = _norm(int(_a(node)[1]) if len(_a(node)) > 1 else 0, src.rank)
    if op_name(node.target) == "select":
        if dim == src.axis:
            return f"select ({node.name}) picks one channel"
        return src.moved(len(out), src.axis - (dim < src.axis))
    if dim == src.axis and out[dim] != src.length:
        return f"slice ({node.name}) cuts the channel axis"
    return src


_RULES: dict[str, Callable[..., Track | str]] = {
    **{n: _reduce for n in REDUCE},
    "softmax": _softmax,
    "_softmax": _softmax,
    "log_softmax": _softmax,
    "_log_softmax": _softmax,
    "flatten": _flatten,
    "view": _view,
    "reshape": _view,
    "_unsafe_view": _view,
    "unsqueeze": _unsqueeze,
    "squeeze": _squeeze,
    "permute": _permute,
    "transpose": _transpose,
    "t": _transpose,
    "slice": _slice,
    "select": _slice,
}


def propagate_cat(
    node: torch.fx.Node, inputs: dict[torch.fx.Node, Track], union: Union
) -> Track | str | None:
    """``cat``: spaces along the channel axis sit at offsets; along another axis they unite."""
    tensors = list(_a(node)[0])
    out = _shape(node)
    if out is None:
        return None
    dim = _norm(int(_a(node)[1]) if len(_a(node)) > 1 else 0, len(out))
    tracked = [inputs[t] for t in tensors if t in inputs]
    if not tracked:
        return None
    if any(t.axis != tracked[0].axis for t in tracked):
        return f"cat ({node.name}) of values with channels on different axes"
    axis = tracked[0].axis
    if dim != axis:
        if len(tracked) != len(tensors):
            return f"cat ({node.name}) of pruned and unpruned values"
        return _elementwise_like(node, tracked, union)
    segs: list[tuple[int, torch.Tensor]] = []
    offset = 0
    for t in tensors:
        shape = _shape(t)
        if shape is None:
            return f"cat ({node.name}) of non-tensors"
        if t in inputs:
            segs += [(s, index + offset) for s, index in inputs[t].segs]
        offset += shape[dim]
    return Track(len(out), axis, out[axis], tuple(segs))


def _elementwise_like(node: torch.fx.Node, tracked: list[Track], union: Union) -> Track | str:
    ref = tracked[0]
    for t in tracked[1:]:
        if len(t.segs) != len(ref.segs):
            return f"{node.name}: operands carry channels differently"
        for (sa, ia), (sb, ib) in zip(ref.segs, t.segs, strict=True):
            if ia.shape != ib.shape or not torch.equal(ia, ib):
                return f"{node.name}: operands carry channels at different positions"
            union(sa, sb)
    return ref
