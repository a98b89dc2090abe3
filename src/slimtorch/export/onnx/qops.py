"""Low-bit ONNX encodings of one weight, as numpy arrays and the ONNX nodes that decode them.

Three encodings, all exact (the decoded values equal the model's effective float weight):

* ``qdq``: integer codes (int8/uint8, or int4/uint4 at opset >= 21) and a ``DequantizeLinear``
  with a scale and zero point per tensor, per axis, or per block (opset 21 blocked form), then
  an optional Reshape/Transpose back to the initializer's layout.
* ``codebook``: indices (uint8, or uint4 decoded by a DequantizeLinear with scale 1) cast to
  int32 and looked up with ``Gather(codebook, indices)``.
* ``MatMulNBits`` (com.microsoft, 4-bit, block-wise), which replaces the matrix product that
  consumes the weight (see :func:`matmul_nbits_nodes`). The dynamic-int8 chain (int8
  activations, ``MatMulInteger``) is in :mod:`slimtorch.export.onnx.dynamic`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from onnx import TensorProto, helper, numpy_helper

MS_DOMAIN = "com.microsoft"


@dataclass
class Encoded:
    """Codes ``q`` (2-D integer array) and how they decode to the initializer's values.

    qdq: ``(q - zero_point) * scale`` along ``axis`` (scale 0-D: per tensor; 1-D: per axis;
    2-D with ``block_size``: blocks along ``axis``). codebook: ``codebook[q]``. ``post`` lists
    ("reshape", shape) / ("transpose", perm) steps applied after decoding."""

    kind: str  # "qdq" | "codebook"
    q: np.ndarray
    bits: int
    signed: bool
    scale: np.ndarray | None = None
    zero_point: np.ndarray | None = None
    axis: int = 0
    block_size: int | None = None
    codebook: np.ndarray | None = None
    post: list[tuple[str, tuple[int, ...]]] = field(default_factory=list)

    @property
    def needs_opset21(self) -> bool:
        return self.block_size is not None or self.bits <= 4


def _expand(p: np.ndarray, shape: tuple[int, ...], axis: int, block: int | None) -> np.ndarray:
    if p.ndim == 0:
        return np.broadcast_to(p, shape)
    if block is None:
        view = [1] * len(shape)
        view[axis] = shape[axis]
        return np.broadcast_to(p.reshape(view), shape)
    return np.repeat(p, block, axis=axis)[tuple(slice(0, s) for s in shape)]


def decode(enc: Encoded) -> np.ndarray:
    """The float32 values ``enc`` decodes to, computed as onnxruntime does."""
    if enc.kind == "codebook":
        assert enc.codebook is not None
        out = enc.codebook.astype(np.float32)[enc.q.astype(np.int64)]
    else:
        assert enc.scale is not None and enc.zero_point is not None
        shape = enc.q.shape
        zp = _expand(enc.zero_point.astype(np.int32), shape, enc.axis, enc.block_size)
        scale = _expand(enc.scale.astype(np.float32), shape, enc.axis, enc.block_size)
        out = (enc.q.astype(np.int32) - zp).astype(np.float32) * scale
    for op, arg in enc.post:
        out = out.reshape(arg) if op == "reshape" else out.transpose(arg)
    return np.ascontiguousarray(out, dtype=np.float32)


def storage_type(bits: int, signed: bool, int4: bool) -> int:
    """The ONNX element type holding ``bits``-bit codes (4-bit types only when ``int4``)."""
    if bits <= 4 and int4:
        return TensorProto.INT4 if signed else TensorProto.UINT4
    return TensorProto.INT8 if signed else TensorProto.UINT8


def int_tensor(name: str, values: np.ndarray, elem: int) -> TensorProto:
    """An integer initializer of ONNX type ``elem`` (4-bit types are packed two per byte)."""
    if elem in (TensorProto.INT4, TensorProto.UINT4):  # raw bytes, low nibble first
        flat = values.astype(np.int64).reshape(-1) & 15
        packed = pack_nibbles(np.pad(flat, (0, flat.size % 2)))
        return helper.make_tensor(name, elem, list(values.shape), packed.tobytes(), raw=True)
    dtypes: dict[int, Any] = {TensorProto.INT8: np.int8, TensorProto.UINT16: np.uint16}
    dtype = dtypes.get(int(elem), np.uint8)
    return numpy_helper.from_array(values.astype(dtype), name)


def float_tensor(name: str, values: np.ndarray) -> TensorProto:
    return numpy_helper.from_array(np.ascontiguousarray(values, dtype=np.float32), name)


def _post_nodes(enc: Encoded, src: str, out: str, prefix: str) -> tuple[list[Any], list[Any]]:
    nodes, inits = [], []
    for i, (op, arg) in enumerate(enc.post):
        dst = out if i == len(enc.post) - 1 else f"{prefix}_post{i}"
        if op == "reshape":
            shape = numpy_helper.from_array(np.array(arg, dtype=np.int64), f"{prefix}_shape{i}")
            inits.append(shape)
            nodes.append(helper.make_node("Reshape", [src, shape.name], [dst]))
        else:
            nodes.append(helper.make_node("Transpose", [src], [dst], perm=list(arg)))
        src = dst
    return nodes, inits


def decode_nodes(enc: Encoded, out: str, int4: bool) -> tuple[list[Any], list[TensorProto]]:
    """Nodes and initializers that compute ``out`` (the old initializer's name) from ``enc``."""
    prefix = f"{out}_lowbit"
    elem = storage_type(enc.bits, enc.signed, int4)
    q = int_tensor(f"{prefix}_q", enc.q, elem)
    decoded = f"{prefix}_dq" if enc.post else out
    if enc.kind == "codebook":
        assert enc.codebook is not None
        book = float_tensor(f"{prefix}_codebook", enc.codebook)
        inits = [q, book]
        idx_src = q.name
        nodes = []
        if elem == TensorProto.UINT4:  # uint4 -> float (scale 1) -> int32: exact below 16
            one = float_tensor(f"{prefix}_one", np.array(1.0))
            inits.append(one)
            nodes.append(helper.make_node("DequantizeLinear", [q.name, one.name], [f"{prefix}_f"]))
            idx_src = f"{prefix}_f"
        nodes.append(helper.make_node("Cast", [idx_src], [f"{prefix}_idx"], to=TensorProto.INT32))
        nodes.append(helper.make_node("Gather", [book.name, f"{prefix}_idx"], [decoded], axis=0))
    else:
        assert enc.scale is not None and enc.zero_point is not None
        scale = float_tensor(f"{prefix}_scale", enc.scale)
        zp = int_tensor(f"{prefix}_zp", enc.zero_point, elem)
        inits = [q, scale, zp]
        attrs: dict[str, Any] = {"axis": enc.axis} if enc.scale.ndim > 0 else {}
        if enc.block_size is not None:
            attrs["block_size"] = enc.block_size
        nodes = [
            helper.make_node("DequantizeLinear", [q.name, scale.name, zp.name], [decoded], **attrs)
        ]
    post_nodes, post_inits = _post_nodes(enc, decoded, out, prefix)
    return nodes + post_nodes, inits + post_inits


def _loaded_codes(
    enc: Encoded, prefix: str, table: np.ndarray | None
) -> tuple[list[Any], list[TensorProto], str]:
    """Nodes producing ``table[q]`` (or float ``q`` when no table) from stored codes, as float32.

    4-bit codes (``enc.bits <= 4``) are packed two per byte (low nibble first) and looked up in
    unpacked with int32 Div/Mul/Sub and looked up in a 16-entry table (the codebook, or the
    code values); wider codes are int8/uint8 and cast (or gathered)."""
    rows, cols = enc.q.shape
    shape = numpy_helper.from_array(np.array([rows, cols], np.int64), f"{prefix}_qshape")
    if enc.bits <= 4:  # int32 arithmetic unpacks the nibbles; a 16-entry table decodes them
        nib = np.pad(enc.q.reshape(-1) & 15, (0, enc.q.size % 2))
        packed = numpy_helper.from_array(pack_nibbles(nib), f"{prefix}_q")
        if table is None:
            table = (np.arange(16) - (16 * (np.arange(16) >= 8) if enc.signed else 0)).astype(
                np.float32
            )
        consts = [
            float_tensor(f"{prefix}_table", table),
            numpy_helper.from_array(np.array(16, np.int32), f"{prefix}_16"),
            numpy_helper.from_array(np.array([-1], np.int64), f"{prefix}_flat"),
            numpy_helper.from_array(np.array([0], np.int64), f"{prefix}_start"),
            numpy_helper.from_array(np.array([rows * cols], np.int64), f"{prefix}_stop"),
            numpy_helper.from_array(np.array([1], np.int64), f"{prefix}_axis1"),
        ]
        n = lambda k: f"{prefix}_{k}"  # noqa: E731
        nodes = [
            helper.make_node("Cast", [packed.name], [n("i")], to=TensorProto.INT32),
            helper.make_node("Div", [n("i"), n("16")], [n("hi")]),
            helper.make_node("Mul", [n("hi"), n("16")], [n("hi16")]),
            helper.make_node("Sub", [n("i"), n("hi16")], [n("lo")]),
            helper.make_node("Unsqueeze", [n("lo"), n("axis1")], [n("lo2")]),
            helper.make_node("Unsqueeze", [n("hi"), n("axis1")], [n("hi2")]),
            helper.make_node("Concat", [n("lo2"), n("hi2")], [n("pairs")], axis=1),
            helper.make_node("Reshape", [n("pairs"), n("flat")], [n("all")]),
            helper.make_node("Slice", [n("all"), n("start"), n("stop")], [n("idx")]),
            helper.make_node("Gather", [n("table"), n("idx")], [n("g")], axis=0),
            helper.make_node("Reshape", [n("g"), shape.name], [n("v")]),
        ]
        return nodes, [packed, *consts, shape], n("v")
    elem = TensorProto.INT8 if enc.signed else TensorProto.UINT8
    if enc.kind == "codebook" and enc.bits > 8:  # > 256 entries: 16-bit indices
        elem = TensorProto.UINT16
    q = int_tensor(f"{prefix}_q", enc.q, elem)
    if table is None:
        return (
            [helper.make_node("Cast", [q.name], [f"{prefix}_v"], to=TensorProto.FLOAT)],
            [q],
            (f"{prefix}_v"),
        )
    book = float_tensor(f"{prefix}_codebook", table)
    nodes = [
        helper.make_node("Cast", [q.name], [f"{prefix}_idx"], to=TensorProto.INT32),
        helper.make_node("Gather", [book.name, f"{prefix}_idx"], [f"{prefix}_v"], axis=0),
    ]
    return nodes, [q, book], f"{prefix}_v"


def load_decode_nodes(enc: Encoded, out: str) -> tuple[list[Any], list[TensorProto]]:
    """Nodes computing ``out`` from ``enc`` with plain ops on initializers only (Cast, Gather,
    Reshape, Sub, Mul): onnxruntime constant-folds them when it loads the file, so the weight
    is small on disk and dense float32 in memory, and runs at float speed. Exact: the same
    ``(q - zero_point) * scale`` float32 arithmetic as DequantizeLinear, any opset >= 13."""
    prefix = f"{out}_lowbit"
    if enc.kind == "codebook":
        assert enc.codebook is not None
        book = enc.codebook.astype(np.float32)
        if enc.bits <= 4:
            book = np.pad(book, (0, 16 - book.size))
        nodes, inits, v = _loaded_codes(enc, prefix, book)
    else:
        assert enc.scale is not None and enc.zero_point is not None
        nodes, inits, v = _loaded_codes(enc, prefix, None)
        rows, cols = enc.q.shape
        scale, zp = enc.scale.astype(np.float32), enc.zero_point.astype(np.float32)
        if enc.block_size is not None:  # [R, G * g] view with a scale per [R, G, 1]
            g, groups = enc.block_size, scale.shape[1]
            pad = numpy_helper.from_array(np.array([0, 0, 0, groups * g - cols], np.int64),
                                          f"{prefix}_pad")  # fmt: skip
            blocks = numpy_helper.from_array(np.array([rows, groups, g], np.int64), f"{prefix}_b")
            inits += [pad, blocks]
            nodes += [
                helper.make_node("Pad", [v, pad.name], [f"{prefix}_vp"]),
                helper.make_node("Reshape", [f"{prefix}_vp", blocks.name], [f"{prefix}_vb"]),
            ]
            v, scale, zp = f"{prefix}_vb", scale[:, :, None], zp[:, :, None]
        elif scale.ndim == 1:
            scale, zp = scale[:, None], zp[:, None]
        if zp.any():  # stored as 8-bit integers like the codes, cast (folded) to float
            elem = TensorProto.INT8 if enc.signed else TensorProto.UINT8
            inits.append(int_tensor(f"{prefix}_zp", zp, elem))
            nodes += [
                helper.make_node("Cast", [f"{prefix}_zp"], [f"{prefix}_zpf"], to=TensorProto.FLOAT),
                helper.make_node("Sub", [v, f"{prefix}_zpf"], [f"{prefix}_vz"]),
            ]
            v = f"{prefix}_vz"
        inits.append(float_tensor(f"{prefix}_scale", scale))
        done = f"{prefix}_dq" if enc.post or enc.block_size is not None else out
        nodes.append(helper.make_node("Mul", [v, f"{prefix}_scale"], [done]))
        v = done
        if enc.block_size is not None:
            flat = numpy_helper.from_array(np.array([rows, -1], np.int64), f"{prefix}_rows")
            start = numpy_helper.from_array(np.array([0], np.int64), f"{prefix}_c0")
            stop = numpy_helper.from_array(np.array([cols], np.int64), f"{prefix}_c1")
            axis = numpy_helper.from_array(np.array([1], np.int64), f"{prefix}_ax")
            inits += [flat, start, stop, axis]
            end = f"{prefix}_dq2" if enc.post else out
            nodes += [
                helper.make_node("Reshape", [v, flat.name], [f"{prefix}_vr"]),
                helper.make_node(
                    "Slice", [f"{prefix}_vr", start.name, stop.name, axis.name], [end]
                ),
            ]
            v = end
    if enc.kind == "codebook" and not enc.post:
        nodes.append(helper.make_node("Identity", [v], [out]))
    post_nodes, post_inits = _post_nodes(enc, v, out, prefix)
    return nodes + post_nodes, inits + post_inits


def pack_nibbles(codes: np.ndarray) -> np.ndarray:
    """``uint8 [..., n / 2]`` from codes 0..15 ``[..., n]`` (n even), low nibble first."""
    c = codes.astype(np.uint8)
    return (c[..., 0::2] | (c[..., 1::2] << 4)).astype(np.uint8)


def matmul_nbits_nodes(
    name: str,
    inputs: tuple[str, str | None],
    output: str,
    codes: np.ndarray,
    params: tuple[np.ndarray, np.ndarray, int],
    bits: int,
) -> tuple[Any, list[TensorProto]]:
    """``MatMulNBits`` computing ``x @ W^T (+ bias)`` for ``W = (codes - zp) * scale`` per block.

    ``codes`` unsigned ``[N, K]`` (0..15 for ``bits=4``, 0..255 for 8), ``params`` = (scale,
    zero point ``[N, ceil(K / block)]``, block); ``inputs`` is (activation, bias or None).
    ``accuracy_level=1``: float32 arithmetic, so the product is that of the decoded weight."""
    scale, zero_point, block = params
    n, k = codes.shape
    k_blocks = scale.shape[1]
    padded = np.repeat(zero_point, block, axis=1)[:, : k_blocks * block].copy()
    padded[:, :k] = codes
    blocks = padded.reshape(n, k_blocks, block)
    if bits == 4:
        b = pack_nibbles(blocks)
        zp_cols = zero_point if k_blocks % 2 == 0 else np.pad(zero_point, ((0, 0), (0, 1)))
        zp = pack_nibbles(zp_cols).reshape(-1)
    else:
        b, zp = blocks.astype(np.uint8), zero_point.astype(np.uint8).reshape(-1)
    inits = [
        numpy_helper.from_array(b, f"{name}_B"),
        float_tensor(f"{name}_scales", scale.reshape(-1)),
        numpy_helper.from_array(zp, f"{name}_zp"),
    ]
    names = [inputs[0], *(t.name for t in inits)]
    if inputs[1] is not None:
        names += ["", inputs[1]]  # g_idx unused, then bias
    node = helper.make_node(
        "MatMulNBits", names, [output], domain=MS_DOMAIN,
        K=k, N=n, bits=bits, block_size=block, accuracy_level=1,
    )  # fmt: skip
    return node, inits
