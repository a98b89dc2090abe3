"""Read a written ``.mlpackage`` back and check its compressed weights (Core ML cannot run here).

:func:`read_package` loads the package's model spec and weight blob from disk into a MIL
program (coremltools' own protobuf reader), decodes every ``constexpr_*`` weight as Core ML
defines the op (``materialized_val_inference``), follows a ``reshape``/``transpose`` to the
consuming op, and requires each decoded weight to equal one of the model's compressed weights
exactly; it reports the program's ops and every compressed weight's storage.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from slimtorch.core.errors import UnsupportedModelError
from slimtorch.export.onnx.sources import Matcher, Source

_LAYOUT_OPS = ("reshape", "transpose", "slice_by_index")


def load_program(path: Path) -> Any:
    """The MIL program of the package at ``path``, weights read from its blob file."""
    import coremltools as ct
    from coremltools.converters.mil.frontend.milproto.load import load

    spec = ct.utils.load_spec(str(path))
    weights = path / "Data" / "com.apple.CoreML" / "weights"
    return load(spec, spec.specificationVersion, str(weights))


def _dtype_name(var: Any) -> str:
    from coremltools.converters.mil.mil import types

    return str(types.builtin_to_string(var.dtype))


def _decoded(op: Any) -> tuple[np.ndarray, Any]:
    """The op's dense value and the op it reaches through reshape/transpose ops."""
    val = np.asarray(op.materialized_val_inference())
    last = op
    children = op.outputs[0].child_ops
    while len(children) == 1 and children[0].op_type in _LAYOUT_OPS:
        child = children[0]
        if child.op_type == "reshape":
            val = val.reshape(tuple(child.shape.val))
        elif child.op_type == "slice_by_index":
            val = val[tuple(slice(int(b), int(e)) for b, e in zip(child.begin.val, child.end.val))]
        else:
            val = np.transpose(val, tuple(child.perm.val))
        last, children = child, child.outputs[0].child_ops
    return val, last


def _describe(op: Any) -> dict[str, Any]:
    if op.op_type == "constexpr_lut_to_dense":
        lut = op.lut
        return {
            "op": op.op_type,
            "indices": _dtype_name(op.indices),
            "lut_entries": int(lut.shape[-2]),
            "lut_dtype": _dtype_name(lut),
            "shape": list(op.indices.shape),
        }
    if op.op_type == "constexpr_blockwise_shift_scale":
        return {
            "op": op.op_type,
            "data": _dtype_name(op.data),
            "scale_shape": list(op.scale.shape),
            "scale_dtype": _dtype_name(op.scale),
            "offset": None if op.offset is None else _dtype_name(op.offset),
            "shape": list(op.data.shape),
        }
    return {"op": op.op_type}


def read_package(path: Path, sources: Sequence[Source]) -> dict[str, Any]:
    """Check that every compressed weight of the package at ``path`` decodes exactly to one of
    ``sources``' weights; its ops and compressed weights."""
    prog = load_program(path)
    matcher = Matcher(list(sources))
    ops: dict[str, int] = {}
    weights = []
    for func in prog.functions.values():
        for op in func.operations:
            ops[op.op_type] = ops.get(op.op_type, 0) + 1
            if not op.op_type.startswith("constexpr_"):
                continue
            val, last = _decoded(op)
            found = matcher.match("", val.astype(np.float32))
            if found is None or found.layout != "same":
                raise UnsupportedModelError(
                    f"{path}: the weight {op.name} decodes to values no compressed weight of the"
                    " model has (Core ML would compute something else)"
                )
            users = sorted({c.op_type for c in last.outputs[0].child_ops})
            weights.append({"param": found.source.param, **_describe(op), "used_by": users})
    consts = [
        w
        for w in weights
        if w["op"] in ("constexpr_lut_to_dense", "constexpr_blockwise_shift_scale")
    ]
    return {
        "ops": ops,
        "compressed_weights": consts,
        "decoded_equal": len(consts),
        "weight_blob_bytes": _blob_bytes(path),
    }


def _blob_bytes(path: Path) -> int:
    weights = path / "Data" / "com.apple.CoreML" / "weights"
    return sum(f.stat().st_size for f in weights.rglob("*") if f.is_file())
