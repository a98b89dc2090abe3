"""Check a written OpenVINO IR in the CPU plugin against the model it came from.

:func:`verify` reads the IR back, counts its constants by element type, runs it with
:data:`EXACT` (f32 arithmetic, no dynamic int8 quantization of the activations of
compressed-weight FullyConnected layers: the CPU plugin's default for u8/i8/u4 weights, which
moves LeNet-5 int8's outputs by 0.03) at the example's batch size and one larger, within the ONNX
export's tolerance, and times it against PyTorch, with the plugin's defaults timed too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from slimtorch.core.errors import UnsupportedModelError
from slimtorch.export.onnx.verify import (
    ATOL,
    RTOL,
    _torch_ms,
    _torch_outputs,
    compare_outputs,
    median_ms,
)

EXACT = {"INFERENCE_PRECISION_HINT": "f32", "DYNAMIC_QUANTIZATION_GROUP_SIZE": 0}
ONE_THREAD = {"INFERENCE_NUM_THREADS": 1, "NUM_STREAMS": 1}


def _constants(ov_model: Any) -> dict[str, dict[str, int]]:
    """Bytes and count of the IR's constants by element type."""
    out: dict[str, dict[str, int]] = {}
    for node in ov_model.get_ordered_ops():
        if node.get_type_name() == "Constant":
            row = out.setdefault(str(node.get_element_type().get_type_name()), {"n": 0, "bytes": 0})
            row["n"] += 1
            row["bytes"] += int(node.get_byte_size())
    return out


def _batched(inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """The example inputs with the batch one larger (the first row repeated)."""
    return tuple(torch.cat([t, t[:1]]) for t in inputs)


def _check(model: nn.Module, compiled: Any, inputs: tuple[torch.Tensor, ...]) -> dict[str, Any]:
    expected = _torch_outputs(model, inputs)
    result = compiled([t.detach().numpy() for t in inputs])
    actual = [np.asarray(result[o]) for o in compiled.outputs]
    check = compare_outputs(expected, actual, ATOL, RTOL)
    if not check["ok"]:
        raise UnsupportedModelError(
            f"OpenVINO's outputs differ from slimtorch's by up to {check['max_abs_diff']:.3g}"
            f" (tolerance {ATOL} + {RTOL} x |value|) at input shapes"
            f" {[tuple(t.shape) for t in inputs]}"
        )
    return check


def verify(ov: Any, model: nn.Module, path: Path, args: tuple[Any, ...]) -> dict[str, Any]:
    """Read the IR back, count its constants, run it in the CPU plugin at two batch sizes."""
    core = ov.Core()
    read = core.read_model(str(path))
    compiled = core.compile_model(read, "CPU", {**EXACT, **ONE_THREAD})
    check = _check(model, compiled, args)
    shapes = [[list(t.shape) for t in args]]
    if all(isinstance(t, torch.Tensor) and t.dim() > 0 for t in args):
        bigger = _batched(args)
        _check(model, compiled, bigger)
        shapes.append([list(t.shape) for t in bigger])
    feed = [t.detach().numpy() for t in args]
    default = core.compile_model(read, "CPU", ONE_THREAD)  # bf16 / dynamic int8 activations
    expected = _torch_outputs(model, args)
    got = default(feed)
    default_diff = max(float(np.abs(np.asarray(got[o]) - e).max())
                       for o, e in zip(default.outputs, expected, strict=True))  # fmt: skip
    return {
        "constants": _constants(read),
        "runtime_layers": _runtime_layers(compiled),
        "max_abs_diff": check["max_abs_diff"],
        "atol": ATOL,
        "rtol": RTOL,
        "config": {k: str(v) for k, v in EXACT.items()},
        "checked_shapes": shapes,
        "openvino_ms": median_ms(lambda: compiled(feed)),
        "openvino_default_ms": median_ms(lambda: default(feed)),
        "openvino_default_max_abs_diff": default_diff,
        "torch_ms": _torch_ms(model, args),
    }


def _runtime_layers(compiled: Any) -> dict[str, int]:
    """How many layers of each type and precision the CPU plugin runs (``FullyConnected i8``:
    int8 weights kept compressed in memory)."""
    counts: dict[str, int] = {}
    for node in compiled.get_runtime_model().get_ordered_ops():
        info = node.get_rt_info()
        kind = info["layerType"].astype(str)
        if kind in ("Const", "Input", "Output", "Reorder"):
            continue
        key = f"{kind} {info['runtimePrecision'].astype(str)}"
        counts[key] = counts.get(key, 0) + 1
    return counts
