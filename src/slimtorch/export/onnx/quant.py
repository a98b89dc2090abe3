"""Rewrite a dense-float ONNX export so that compressed weights are stored low-bit.

:func:`quantize_onnx` takes the file written by ``torch.onnx.export`` and the model it came
from, maps every float initializer back to the compressed weight it holds (by parameter name,
else by value: same layout, transposed, or row by row for LSTM/GRU gate stacks) and replaces it:

======================================  ==========================================================
weight state                            ONNX
======================================  ==========================================================
decode="load" (default), any grid      int8/uint8 codes (4-bit: two per byte) + ``Cast`` (or
                                        ``Gather`` of a 256-entry nibble-pair table),
                                        ``Sub``/``Mul`` by zero point and scale, per tensor, row
                                        or group: folded by onnxruntime at load time
                                        (codebooks: ``Gather`` of the codebook)
decode="run": affine <= 8 bits          int8/uint8 codes + ``DequantizeLinear`` (scale, zero
                                        point, axis); 2-4 bits: int4/uint4 codes (opset >= 21)
affine per group                        blocked ``DequantizeLinear`` (opset 21, ``block_size``)
affine 2-4-bit per group, on a Linear   ``com.microsoft.MatMulNBits`` (bits 4, block = group,
                                        power of two >= 16), replacing the MatMul/Gemm
binary / ternary                        codes -1/0/+1 as int4 (int8 below opset 21) + DQ
codebook (k-means)                      uint8 (uint4 for <= 16 centroids) indices, ``Cast`` and
                                        ``Gather(codebook, indices)``
Int8DynamicLinear (dynamic_int8, w8a8)  per-token activation codes (ReduceMax/Min, Div, Floor,
                                        Cast) ``-> MatMulInteger -> Cast -> Mul/Sub (-> Add)``:
                                        the int8 arithmetic of slimtorch.runtime.int8
mask only (unstructured / N:M sparse)   dense float (ONNX has no sparse weight onnxruntime runs)
======================================  ==========================================================

Every encoding is checked to decode to exactly the exported float values before it is written.
A weight that cannot be expressed (a per-group grid below opset 21, an initializer that matches
no weight, mixed codebooks in one LSTM stack, ...) stays dense float, is listed under ``dense``
with the reason, and logs a warning; ``strict=True`` raises :class:`OnnxExportError` instead.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from onnx import ModelProto, helper, numpy_helper

from slimtorch.export.onnx.dynamic import dynamic_int8_nodes
from slimtorch.export.onnx.qops import (
    MS_DOMAIN,
    Encoded,
    decode,
    decode_nodes,
    load_decode_nodes,
    matmul_nbits_nodes,
)
from slimtorch.export.onnx.sources import Match, Matcher, Source, unmatched_reason

log = logging.getLogger(__name__)

OPSET_LOWBIT = 21  # int4/uint4 and blocked DequantizeLinear
_MIN_ELEMENTS = 16


@dataclass
class Rewrite:
    """What :func:`quantize_onnx` changed: ``layers`` written low-bit, ``dense`` kept float."""

    layers: list[dict[str, Any]] = field(default_factory=list)
    dense: list[dict[str, str]] = field(default_factory=list)
    opset: int | None = None
    dynamic: bool = False


def _per_row(scale: np.ndarray, zp: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``[R, 1]`` per-row parameters as 1-D, or 0-D when every row has the same pair."""
    s, z = scale.reshape(-1), zp.reshape(-1)
    if (s == s[0]).all() and (z == z[0]).all():
        return s[:1].reshape(()), z[:1].reshape(())
    return s, z


_STORAGE = {2: "uint8", 3: "int8", 4: "uint16", 21: "uint4", 22: "int4"}


def _rows_encoding(m: Match, shape: tuple[int, ...]) -> Encoded | str:
    assert m.rows is not None
    srcs = {id(s): s for s, _ in m.rows}.values()
    first = m.source
    if len({(s.codebook is None, s.signed, s.group) for s in srcs}) > 1:
        return "its rows come from weights with different kinds of quantization grid"
    post: list[tuple[str, tuple[int, ...]]] = [("reshape", shape)]
    if first.codebook is not None:  # one Gather: the codebooks side by side, indices offset
        offsets: dict[str, int] = {}
        books: list[np.ndarray] = []
        for s in srcs:
            offsets[s.param] = sum(b.size for b in books)
            books.append(s.codebook if s.codebook is not None else np.zeros(0, np.float32))
        book = np.concatenate(books)
        if book.size > 256:
            return f"its rows use {book.size} codebook entries together (more than 8 bits)"
        q = np.stack([s.codes[i] + offsets[s.param] for s, i in m.rows])
        bits = max(1, int(book.size - 1).bit_length())
        return Encoded("codebook", q, bits, False, codebook=book, post=post)
    q = np.stack([s.codes[i] for s, i in m.rows])
    bits = max(s.bits for s in srcs)
    scale = np.stack([s.scale[i] for s, i in m.rows])
    zp = np.stack([s.zero_point[i] for s, i in m.rows])
    if first.group is None:
        return Encoded("qdq", q, bits, first.signed, *_per_row(scale, zp), 0, None, post=post)
    return Encoded("qdq", q, bits, first.signed, scale, zp, 1, first.group, post=post)


def encoding(m: Match, shape: tuple[int, ...]) -> Encoded | str:
    """The low-bit form of an initializer of ``shape`` matched to ``m``, or why there is none."""
    if m.layout == "rows":
        return _rows_encoding(m, shape)
    s = m.source
    q, nd = s.codes, len(shape)
    post: list[tuple[str, tuple[int, ...]]] = []
    if m.layout == "transposed":  # DQ on [N, K], then Transpose: never DQ -> MatMul (fused)
        post = [("transpose", (1, 0))]
    elif nd > 2 and (s.group is None or s.codebook is not None):  # natural [out, rest] layout
        natural = np.moveaxis(q.reshape(shape[0], *shape[2:], shape[1]), -1, 1)
        q, post = natural.reshape(shape[0], -1), [("reshape", shape)]
    elif nd > 2:  # per-group conv: groups live in the [out, kh*kw*in] matrix view
        post = [
            ("reshape", (shape[0], *shape[2:], shape[1])),
            ("transpose", (0, nd - 1, *range(1, nd - 1))),
        ]
    elif nd != 2:
        post = [("reshape", shape)]
    if s.codebook is not None:
        return Encoded("codebook", q, s.bits, False, codebook=s.codebook, post=post)
    if s.group is None:
        scale, zp = _per_row(s.scale, s.zero_point)
        return Encoded("qdq", q, s.bits, s.signed, scale, zp, 0, None, post=post)
    return Encoded("qdq", q, s.bits, s.signed, s.scale, s.zero_point, 1, s.group, post=post)


def _consumers(model: ModelProto, name: str) -> list[tuple[int, Any]]:
    return [(i, n) for i, n in enumerate(model.graph.node) if name in n.input]


def _product_inputs(node: Any, name: str, m: Match) -> tuple[str, str | None] | None:
    """(activation, bias) when ``node`` computes ``x @ W^T (+ bias)`` with ``W`` = the source."""
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if node.op_type == "MatMul" and list(node.input)[1:] == [name] and m.layout == "transposed":
        return node.input[0], None
    if node.op_type == "Gemm" and len(node.input) >= 2 and node.input[1] == name:
        plain = attrs.get("transA", 0) == 0 and attrs.get("alpha", 1.0) == 1.0
        plain = plain and attrs.get("beta", 1.0) == 1.0 and attrs.get("transB", 0) == 1
        if plain and m.layout == "same":
            return node.input[0], (node.input[2] if len(node.input) > 2 and node.input[2] else None)
    return None


def _nbits_params(s: Source, k: int) -> tuple[int, tuple[np.ndarray, np.ndarray, int]] | None:
    """(bits, (scale, unsigned zero point, block)) of ``s`` as MatMulNBits blocks, or None."""
    g = s.group
    if s.codebook is not None or (g is not None and (g < 16 or g & (g - 1))):
        return None
    bits = 4 if s.bits <= 4 else 8
    offset = 2 ** (bits - 1) if s.signed else 0
    zp = s.zero_point + offset
    if zp.min() < 0 or zp.max() >= 2**bits:
        return None
    if g is not None:
        return bits, (s.scale, zp, g)
    block = min(128, max(16, 1 << (k - 1).bit_length()))  # one scale per row, repeated per block
    k_blocks = -(-k // block)
    rep = np.repeat(s.scale, k_blocks, axis=1)
    return bits, (rep, np.repeat(zp, k_blocks, axis=1), block)


def _fused(
    model: ModelProto, name: str, m: Match, load: bool
) -> tuple[list[Any], list[Any], int, str] | None:
    """MatMulNBits / dynamic-int8 nodes replacing the one product that consumes ``name``.

    MatMul consumers of weight-only grids get MatMulNBits (4-bit grids, or 8-bit with one
    scale per row): a DequantizeLinear feeding a MatMul is fused by onnxruntime into a
    MatMulNBits with int8 activations (accuracy_level 4), which changes the numbers. Gemm
    consumers keep a DequantizeLinear (not fused) unless the grid is 4-bit per group."""
    s = m.source
    users = _consumers(model, name)
    if m.layout == "rows" or len(users) != 1:
        return None
    index, node = users[0]
    io = _product_inputs(node, name, m)
    if io is None:
        return None
    prefix = f"{name}_lowbit"
    if s.dynamic:
        m.io = (io[0], node.output[0], io[1] is not None)
        opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
        acts = (s.act_qmax, s.act_symmetric)
        weight = (s.codes, s.scale)
        nodes, inits = dynamic_int8_nodes(prefix, io, node.output[0], weight, acts, opset)
        return nodes, inits, index, "MatMulInteger"
    if load:  # weights decoded once at load time: the plain float product stays
        return None
    found = _nbits_params(s, s.codes.shape[1])
    if found is None or (node.op_type == "Gemm" and (found[0] != 4 or s.group is None)):
        return None
    bits, params = found
    codes = s.codes + (2 ** (bits - 1) if s.signed else 0)
    nbits, inits = matmul_nbits_nodes(prefix, io, node.output[0], codes, params, bits)
    return [nbits], inits, index, "MatMulNBits"


def _dense(rw: Rewrite, param: str, reason: str, strict: bool) -> None:
    if strict:
        from slimtorch.export.onnx.export import OnnxExportError

        raise OnnxExportError(
            f"{param} cannot be stored low-bit in ONNX: {reason}; export without strict to keep"
            " it dense float, or change its quantization (see slimtorch.export.onnx.quant)"
        )
    rw.dense.append({"param": param, "reason": reason})


def _replace_initializer(model: ModelProto, name: str, nodes: list[Any], inits: list[Any]) -> None:
    kept = [t for t in model.graph.initializer if t.name != name]
    del model.graph.initializer[:]
    model.graph.initializer.extend([*kept, *inits])
    for i, node in enumerate(nodes):
        model.graph.node.insert(i, node)


def _nbytes(inits: list[Any]) -> int:
    return sum(len(t.raw_data) or numpy_helper.to_array(t).nbytes for t in inits)


def _rewrite_one(
    model: ModelProto, name: str, m: Match, int4: bool, load: bool, rw: Rewrite
) -> str | None:
    """Rewrite initializer ``name``; returns why it stays dense, or None."""
    s = m.source
    fused = _fused(model, name, m, load)
    entry: dict[str, Any] = {"param": s.param, "initializer": name, "layout": m.layout}
    if m.rows is not None:  # e.g. both directions of an LSTM layer in one initializer
        entry["params"] = list(dict.fromkeys(src.param for src, _ in m.rows))
    entry["bits"] = s.bits
    if fused is not None:
        nodes, inits, index, op = fused
        del model.graph.node[index]
        for j, node in enumerate(nodes):
            model.graph.node.insert(index + j, node)
        kept = [t for t in model.graph.initializer if t.name != name]
        del model.graph.initializer[:]
        model.graph.initializer.extend([*kept, *inits])
        rw.dynamic |= op == "MatMulInteger"
        if op == "MatMulInteger" and m.io is not None:  # for the per-layer check in export
            entry.update(activation=m.io[0], output=m.io[1], bias_added=m.io[2])
        rw.layers.append(
            {
                **entry,
                "op": op,
                "storage": "uint4" if op == "MatMulNBits" and s.bits <= 4 else "uint8",
                "bytes": _nbytes(inits),
            }
        )
        return None
    shape = tuple(int(d) for d in next(t.dims for t in model.graph.initializer if t.name == name))
    enc = encoding(m, shape)
    if isinstance(enc, str):
        return enc
    if enc.block_size is not None and not int4 and not load:
        return f"a per-group grid needs blocked DequantizeLinear (opset >= {OPSET_LOWBIT})"
    lo, hi = (
        (-(2 ** (enc.bits - 1)), 2 ** (enc.bits - 1) - 1) if enc.signed else (0, 2**enc.bits - 1)
    )
    if load and enc.kind == "codebook" and enc.bits <= 16:  # uint16 indices (Cast, Gather)
        lo, hi = 0, 2**16 - 1
    elif enc.bits > 8:
        lo, hi = 1, 0  # nothing fits
    if enc.q.min() < lo or enc.q.max() > hi:
        return (
            "its codes need more than 8 bits (a full 8-bit codebook plus a zero for pruned"
            " weights); decode='load' stores such codebook indices as uint16"
        )
    value = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == name))
    if not np.array_equal(decode(enc), value):
        return "its low-bit form does not decode to the exported values"
    if load:
        nodes, inits = load_decode_nodes(enc, name)
        op = "Gather" if enc.kind == "codebook" else "Mul"
        storage = ("int4" if enc.signed else "uint4") if enc.bits <= 4 else None
    else:
        nodes, inits = decode_nodes(enc, name, int4)
        op = "Gather" if enc.kind == "codebook" else "DequantizeLinear"
        storage = None
    _replace_initializer(model, name, nodes, inits)
    storage = storage or _STORAGE.get(inits[0].data_type, str(inits[0].data_type))
    rw.layers.append(
        {
            **entry,
            "op": op,
            "storage": storage,
            "granularity": s.granularity,
            "decode": "load" if load else "run",
            "bytes": _nbytes(inits),
        }
    )
    if s.dynamic:
        log.warning(
            "%s: stored int8 but its product keeps float activations (not a plain MatMul/Gemm)",
            s.param,
        )
    return None


def quantize_onnx(
    model: ModelProto,
    sources: list[Source],
    opset: int | None = None,
    strict: bool = False,
    decode: str = "load",
) -> Rewrite:
    """Rewrite ``model`` in place: every float initializer holding one of ``sources`` low-bit.

    ``opset`` is the opset the user asked for (None: free to raise it to 21 for int4 and
    per-group grids). ``decode``: "load" (plain ops on initializers that onnxruntime folds
    when it loads the file: small on disk, dense float in memory, float speed; any opset) or
    "run" (DequantizeLinear / MatMulNBits: low-bit in memory too, decoded at every run).
    Dynamic-int8 layers are MatMulInteger either way. Returns what was written and what stayed
    dense, and why."""
    if decode not in ("load", "run"):
        raise ValueError(f"decode must be 'load' or 'run', not {decode!r}")
    load = decode == "load"
    default = next(o for o in model.opset_import if o.domain in ("", "ai.onnx"))
    int4 = opset is None or opset >= OPSET_LOWBIT
    matcher = Matcher(sources)
    rw = Rewrite()
    seen: set[str] = set()
    for init in list(model.graph.initializer):
        if init.data_type != 1 or np.prod(init.dims) < _MIN_ELEMENTS:
            continue
        m = matcher.match(init.name, numpy_helper.to_array(init))
        if m is None:
            continue
        why = _rewrite_one(model, init.name, m, int4, load, rw)
        if why is not None:
            _dense(rw, m.source.param, why, strict)
        seen.update(s.param for s, _ in m.rows or [(m.source, 0)])
    unseen = [s for s in sources if s.param not in seen]
    if unseen:
        inits = model.graph.initializer
        floats = {t.name: numpy_helper.to_array(t) for t in inits if t.data_type == 1}
        for s in unseen:
            _dense(rw, s.param, unmatched_reason(s, floats), strict)
    if any(
        e.get("decode") == "run"
        and (e["storage"] in ("int4", "uint4") or e.get("granularity") == "per_group")
        for e in rw.layers
    ):
        default.version = max(default.version, OPSET_LOWBIT)
    if any(e["op"] == "MatMulNBits" for e in rw.layers) and not any(
        o.domain == MS_DOMAIN for o in model.opset_import
    ):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    rw.opset = default.version
    for d in rw.dense:
        log.warning("ONNX export keeps %s dense float: %s", d["param"], d["reason"])
    return rw
