"""The dynamic-int8 ONNX chain that replaces ``x @ W^T (+ bias)`` for an ``Int8DynamicLinear``.

Per-token activation codes from standard ops (ReduceMax/ReduceMin, Div, Round or Floor, Cast),
an exact int32 ``MatMulInteger`` against the layer's int8 weight codes, then ``Cast -> Mul/Sub
(-> Add)`` back to float: the same float32 arithmetic as :mod:`slimtorch.runtime.int8`, so the
codes are identical (see :func:`dynamic_int8_nodes`). The weight-only encodings are in
:mod:`slimtorch.export.onnx.qops`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from slimtorch.export.onnx.qops import float_tensor

_QMAX_S8 = 127


def _const(name: str, value: float | list[int], dtype: type = np.float32) -> TensorProto:
    return numpy_helper.from_array(np.array(value, dtype=dtype), name)


def _reduce(op: str, x: str, out: str, axes: str, opset: int) -> Any:
    """``op`` over the last axis, keeping it (axes became an input in opset 18)."""
    if opset >= 18:
        return helper.make_node(op, [x, axes], [out], keepdims=1)
    return helper.make_node(op, [x], [out], axes=[-1], keepdims=1)


def _quantize_tokens(
    p: str, x: str, qmax: int, symmetric: bool, opset: int
) -> tuple[list[Any], list[TensorProto], str]:
    """Nodes computing Int8DynamicLinear's per-token activation codes of ``x`` (last axis).

    Asymmetric (the oneDNN kernel): ``s = (max(hi, 0) - min(lo, 0)) / qmax``, ``zp =
    floor(-min(lo, 0) / s)``, ``u = trunc(x / s + zp + 0.5)`` as uint8 (``Clip`` to
    ``[0, qmax]`` then ``Floor`` is that truncation). Symmetric (the ``int_mm`` kernel):
    ``s = max|x| / 127``, ``q = round(x * 127 / max|x|)`` (half to even) as int8. Same float32
    operations in the same order as :mod:`slimtorch.runtime.int8`, so the codes are identical."""
    n = lambda k: f"{p}_{k}"  # noqa: E731
    inits = [_const(n("axes"), [-1], np.int64), _const(n("tiny"), 1e-30)]
    nodes = [
        _reduce("ReduceMax", x, n("hi0"), n("axes"), opset),
        _reduce("ReduceMin", x, n("lo0"), n("axes"), opset),
    ]
    if symmetric:
        inits.append(_const(n("qmax"), float(_QMAX_S8)))
        nodes += [
            helper.make_node("Neg", [n("lo0")], [n("nlo")]),
            helper.make_node("Max", [n("hi0"), n("nlo"), n("tiny")], [n("amax")]),
            helper.make_node("Div", [n("qmax"), n("amax")], [n("inv")]),
            helper.make_node("Mul", [x, n("inv")], [n("v")]),
            helper.make_node("Round", [n("v")], [n("r")]),
            helper.make_node("Cast", [n("r")], [n("q")], to=TensorProto.INT8),
            helper.make_node("Div", [n("amax"), n("qmax")], [n("scale")]),
        ]
        return nodes, inits, "int8"
    inits += [_const(n("zero"), 0.0), _const(n("half"), 0.5), _const(n("qmax"), float(qmax))]
    nodes += [
        helper.make_node("Max", [n("hi0"), n("zero")], [n("hi")]),
        helper.make_node("Min", [n("lo0"), n("zero")], [n("lo")]),
        helper.make_node("Sub", [n("hi"), n("lo")], [n("range")]),
        helper.make_node("Max", [n("range"), n("tiny")], [n("range1")]),
        helper.make_node("Div", [n("range1"), n("qmax")], [n("scale")]),
        helper.make_node("Reciprocal", [n("scale")], [n("inv")]),
        helper.make_node("Mul", [n("lo"), n("inv")], [n("lo_s")]),
        helper.make_node("Neg", [n("lo_s")], [n("nlo_s")]),
        helper.make_node("Floor", [n("nlo_s")], [n("zp")]),
        helper.make_node("Add", [n("zp"), n("half")], [n("zp_half")]),
        helper.make_node("Mul", [x, n("inv")], [n("xs")]),
        helper.make_node("Add", [n("xs"), n("zp_half")], [n("v")]),
        helper.make_node("Clip", [n("v"), n("zero"), n("qmax")], [n("vc")]),
        helper.make_node("Floor", [n("vc")], [n("f")]),
        helper.make_node("Cast", [n("f")], [n("q")], to=TensorProto.UINT8),
    ]
    return nodes, inits, "uint8"


def dynamic_int8_nodes(
    name: str,
    inputs: tuple[str, str | None],
    output: str,
    weight: tuple[np.ndarray, np.ndarray],
    activations: tuple[int, bool],
    opset: int,
) -> tuple[list[Any], list[TensorProto]]:
    """``x @ W^T (+ bias)`` computed as :class:`~slimtorch.runtime.int8.Int8DynamicLinear`
    computes it: ``weight`` = (int8 codes ``[N, K]``, per-row scale), ``activations`` = (the
    largest activation code, symmetric); per-token codes (:func:`_quantize_tokens`), an exact
    int32 ``MatMulInteger``, then ``y = s * (ws * acc - zp * ws * rowsum(W)) + bias``.

    Weights are int8 (u8 x s8 products) when activation codes stay below 128: onnxruntime's
    AVX2 kernel sums pairs of u8 x s8 products in int16, which cannot saturate then. 8-bit
    unsigned activations (CPUs with VNNI) get uint8 weights ``codes + 128`` with zero point 128
    (u8 x u8, no saturation anywhere)."""
    x, bias = inputs
    codes, scale = weight
    qmax, symmetric = activations
    nodes, inits, kind = _quantize_tokens(name, x, qmax, symmetric, opset)
    n = lambda k: f"{name}_{k}"  # noqa: E731
    ws = float_tensor(n("Ws"), scale.reshape(-1))
    if kind == "uint8" and qmax > 127:
        w = numpy_helper.from_array((codes.T.astype(np.int16) + 128).astype(np.uint8), n("Wq"))
        wzp = _const(n("Wzp"), 128, np.uint8)
        mm_inputs = [n("q"), w.name, "", wzp.name]
        inits += [w, wzp]
    else:
        w = numpy_helper.from_array(np.ascontiguousarray(codes.T.astype(np.int8)), n("Wq"))
        mm_inputs = [n("q"), w.name]
        inits.append(w)
    inits.append(ws)
    nodes += [
        helper.make_node("MatMulInteger", mm_inputs, [n("acc")]),
        helper.make_node("Cast", [n("acc")], [n("accf")], to=TensorProto.FLOAT),
    ]
    scaled = output if bias is None else n("nobias")
    if symmetric:
        nodes += [
            helper.make_node("Mul", [n("accf"), n("scale")], [n("y0")]),
            helper.make_node("Mul", [n("y0"), ws.name], [scaled]),
        ]
    else:
        colsum = codes.astype(np.int64).sum(axis=1).astype(np.float32) * scale.reshape(-1)
        inits.append(float_tensor(n("colsum"), colsum.astype(np.float32)))
        nodes += [
            helper.make_node("Mul", [n("accf"), ws.name], [n("y0")]),
            helper.make_node("Mul", [n("zp"), n("colsum")], [n("zpc")]),
            helper.make_node("Sub", [n("y0"), n("zpc")], [n("y1")]),
            helper.make_node("Mul", [n("y1"), n("scale")], [scaled]),
        ]
    if bias is not None:
        nodes.append(helper.make_node("Add", [scaled, bias], [output]))
    return nodes, inits
