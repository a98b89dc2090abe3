"""The int8 link codec of a split, added to the exported ONNX parts.

The device part's float outputs (each already checked against PyTorch by the exporter) get
``ReduceMin/ReduceMax -> Sub/Div -> Round -> Clip -> Cast(uint8)`` appended: each becomes three
outputs ``NAME_q`` (uint8 codes, same shape), ``NAME_scale`` and ``NAME_lo`` (float32, one per
row: per token for 3-D tensors ``[batch, tokens, features]``, per sample otherwise). The
server part's matching inputs are replaced by the same three, decoded as
``Cast(float) * scale + lo`` in front of its graph. Non-float tensors (masks, ids) cross as they
are. The error this adds is measured end to end by :mod:`slimtorch.search.split_export`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from onnx import TensorProto, helper, numpy_helper

LEVELS = 255.0


def _opset(model: Any) -> int:
    return next(int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx"))


def _dims(value: Any) -> list[int | str]:
    return [d.dim_param or int(d.dim_value) for d in value.type.tensor_type.shape.dim]


def _axes(rank: int) -> list[int]:
    return [rank - 1] if rank == 3 else list(range(1, rank))


def is_coded(value: Any) -> bool:
    """Whether the codec quantizes this graph input/output (float, at least 2-D)."""
    return value.type.tensor_type.elem_type == TensorProto.FLOAT and len(_dims(value)) >= 2


def _row_shape(dims: list[int | str]) -> list[int | str]:
    axes = _axes(len(dims))
    return [1 if a in axes else d for a, d in enumerate(dims)]


def add_encoder(model: Any) -> list[str]:
    """Quantize ``model``'s float outputs in place; returns the names of the outputs coded."""
    graph, opset = model.graph, _opset(model)
    coded, outputs = [], []
    for out in list(graph.output):
        if not is_coded(out):
            outputs.append(out)
            continue
        name, dims = out.name, _dims(out)
        n = lambda k, name=name: f"{name}_{k}"  # noqa: E731
        axes = _axes(len(dims))
        graph.initializer.extend(
            [
                numpy_helper.from_array(np.array(axes, dtype=np.int64), n("axes")),
                numpy_helper.from_array(np.array(LEVELS, dtype=np.float32), n("levels")),
                numpy_helper.from_array(np.array(0.0, dtype=np.float32), n("zero")),
                numpy_helper.from_array(np.array(1e-12, dtype=np.float32), n("eps")),
            ]
        )
        for op, res in (("ReduceMin", "lo"), ("ReduceMax", "hi")):
            if opset >= 18:
                graph.node.append(helper.make_node(op, [name, n("axes")], [n(res)], keepdims=1))
            else:
                graph.node.append(helper.make_node(op, [name], [n(res)], axes=axes, keepdims=1))
        graph.node.extend(
            [
                helper.make_node("Sub", [n("hi"), n("lo")], [n("range")]),
                helper.make_node("Max", [n("range"), n("eps")], [n("range1")]),
                helper.make_node("Div", [n("range1"), n("levels")], [n("scale")]),
                helper.make_node("Sub", [name, n("lo")], [n("shifted")]),
                helper.make_node("Div", [n("shifted"), n("scale")], [n("v")]),
                helper.make_node("Round", [n("v")], [n("r")]),
                helper.make_node("Clip", [n("r"), n("zero"), n("levels")], [n("c")]),
                helper.make_node("Cast", [n("c")], [n("q")], to=TensorProto.UINT8),
            ]
        )
        rows = _row_shape(dims)
        outputs += [
            helper.make_tensor_value_info(n("q"), TensorProto.UINT8, dims),
            helper.make_tensor_value_info(n("scale"), TensorProto.FLOAT, rows),
            helper.make_tensor_value_info(n("lo"), TensorProto.FLOAT, rows),
        ]
        coded.append(name)
    del graph.output[:]
    graph.output.extend(outputs)
    return coded


def add_decoder(model: Any) -> list[str]:
    """Replace ``model``'s float inputs by (codes, scale, lo) decoded in front of its graph;
    returns the names of the inputs replaced."""
    graph = model.graph
    coded, inputs, front = [], [], []
    for value in list(graph.input):
        if not is_coded(value):
            inputs.append(value)
            continue
        name, dims = value.name, _dims(value)
        n = lambda k, name=name: f"{name}_{k}"  # noqa: E731
        rows = _row_shape(dims)
        inputs += [
            helper.make_tensor_value_info(n("q"), TensorProto.UINT8, dims),
            helper.make_tensor_value_info(n("scale"), TensorProto.FLOAT, rows),
            helper.make_tensor_value_info(n("lo"), TensorProto.FLOAT, rows),
        ]
        front += [
            helper.make_node("Cast", [n("q")], [n("qf")], to=TensorProto.FLOAT),
            helper.make_node("Mul", [n("qf"), n("scale")], [n("scaled")]),
            helper.make_node("Add", [n("scaled"), n("lo")], [name]),
        ]
        coded.append(name)
    nodes = front + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.input[:]
    graph.input.extend(inputs)
    return coded
