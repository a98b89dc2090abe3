"""Check an exported ONNX file in onnxruntime against the PyTorch model it came from.

:func:`compare_outputs` is the elementwise check ``|ort - torch| <= ATOL + RTOL * |torch|``;
:func:`_verify` loads the file in onnxruntime (CPUExecutionProvider, one thread), compares every
output with PyTorch's on the same inputs and times both; :func:`_check_layers` checks each
dynamic-int8 layer on its own. Tolerances: weight-only files decode to exactly the model's
effective weights, so ``ATOL + RTOL * |value|`` holds (float summation order only). Files with
dynamic int8 activations compute the same per-token int8 arithmetic as ``Int8DynamicLinear``;
each such layer is checked on its own (onnxruntime's input to the layer fed to the PyTorch
layer) within ``ATOL + RTOL * |value|``. End to end, float ops between them (LayerNorm,
softmax, LSTM) differ by float rounding, which moves an activation across a rounding boundary
now and then: a one-ulp change of MiniLM's first-layer input moves the PyTorch model's own
output by 5% of its peak. The whole model is therefore checked with
``DYNAMIC_ATOL * max|output| + DYNAMIC_RTOL * |value|``. A file with dynamic axes is checked at
the example's shapes and at another batch size and sequence length. Also holds what the exporter and the
check share: :class:`OnnxExportError`, the onnx/onnxruntime import, and how the model is called.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.utils._pytree as pytree
from torch import nn

from slimtorch.core.errors import UnsupportedModelError, UserInputError
from slimtorch.export.onnx.signature import Signature, check_inputs, file_interface

ATOL = 1e-4
RTOL = 1e-3
# End to end with dynamic int8 activations (every layer is also checked exactly, see above):
# float-rounding differences flip an activation code now and then, and each flip moves the
# output by one step. Measured: LeNet-5 b256 0.05% of the peak output, char-lstm b128 0.07%,
# MiniLM 5.3% (its own output moves 5% under a one-ulp input change, so no tighter bound holds).
DYNAMIC_ATOL = 0.05
DYNAMIC_RTOL = 0.05


class OnnxExportError(UnsupportedModelError):
    """The model could not be exported to ONNX, or the file computes something else."""


class ShapeError(OnnxExportError):
    """A file with dynamic axes that does not compute the model's outputs at another shape."""


def _onnx_modules() -> tuple[Any, Any]:
    try:
        import onnx
        import onnxruntime
    except ImportError:
        raise UserInputError(
            "ONNX export needs onnx and onnxruntime: `pip install 'slimtorch[onnx]'`"
        ) from None
    return onnx, onnxruntime


def tensor_leaves(outputs: Any) -> tuple[torch.Tensor, ...]:
    """The tensors of a (nested) model output, in pytree order; other leaves are dropped."""
    return tuple(t for t in pytree.tree_leaves(outputs) if isinstance(t, torch.Tensor))


def _forward_kwargs(model: nn.Module) -> dict[str, Any]:
    """Hugging Face models export without their key/value cache (not a tensor output)."""
    config = getattr(model, "config", None)
    return {"use_cache": False} if getattr(config, "use_cache", None) is not None else {}


def compare_outputs(
    expected: Sequence[np.ndarray], actual: Sequence[np.ndarray], atol: float, rtol: float
) -> dict[str, Any]:
    """Elementwise ``|actual - expected| <= atol + rtol * |expected|`` over every output.

    Returns ``ok``, ``max_abs_diff``, ``tolerance_used`` (the largest
    ``|actual - expected| / (atol + rtol * |expected|)``: at most 1 when ``ok``) and
    ``worst_output`` (the index of the output where that ratio is largest)."""
    inf = float("inf")
    bad = {"ok": False, "max_abs_diff": inf, "tolerance_used": inf, "worst_output": None}
    if len(expected) != len(actual):
        return {**bad, "reason": f"{len(actual)} outputs, expected {len(expected)}"}
    worst, max_abs, used = 0, 0.0, 0.0
    for i, (e, a) in enumerate(zip(expected, actual, strict=True)):
        if e.shape != a.shape:
            reason = f"output {i} has shape {list(a.shape)}, expected {list(e.shape)}"
            return {**bad, "worst_output": i, "reason": reason}
        e64, a64 = e.astype(np.float64), a.astype(np.float64)
        diff = np.abs(a64 - e64)
        if diff.size == 0:
            continue
        with np.errstate(divide="ignore", invalid="ignore"):
            ratios = np.where(diff > 0, diff / (atol + rtol * np.abs(e64)), 0.0)
        nan = bool(np.isnan(diff).any())
        ratio = inf if nan else float(ratios.max())
        max_abs = inf if nan else max(max_abs, float(diff.max()))
        if ratio > used:
            worst, used = i, ratio
    return {"ok": used <= 1, "max_abs_diff": max_abs, "tolerance_used": used, "worst_output": worst}


def median_ms(fn: Callable[[], Any], budget_s: float = 2.0, max_repeats: int = 20) -> float:
    """Median milliseconds of ``fn()`` after two warm-up calls, at most ``max_repeats`` runs."""
    fn()
    start = time.perf_counter()
    fn()
    repeats = max(3, min(max_repeats, int(budget_s / max(time.perf_counter() - start, 1e-6))))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000.0)
    return float(statistics.median(times))


def _torch_ms(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> float:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same as onnxruntime's intra_op_num_threads below
    try:
        with torch.inference_mode():
            return median_ms(lambda: model(*inputs, **_forward_kwargs(model)))
    finally:
        torch.set_num_threads(threads)


def _session(path: Path | bytes) -> Any:
    _, ort = _onnx_modules()
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    source = path if isinstance(path, bytes) else str(path)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def _feeds(session: Any, names: Sequence[str], inputs: Sequence[torch.Tensor]) -> dict[str, Any]:
    """The inputs by name, only those the file takes (an exporter drops unused inputs)."""
    given = {n: t.detach().cpu().numpy() for n, t in zip(names, inputs, strict=True)}
    return {i.name: given[i.name] for i in session.get_inputs()}


def _torch_outputs(model: nn.Module, inputs: Sequence[torch.Tensor]) -> list[np.ndarray]:
    with torch.inference_mode():
        return [t.cpu().numpy() for t in tensor_leaves(model(*inputs, **_forward_kwargs(model)))]


def _tolerance(expected: Sequence[np.ndarray], dynamic: bool) -> tuple[float, float]:
    if not dynamic:
        return ATOL, RTOL
    peak = max((float(np.abs(e).max()) for e in expected if e.size), default=1.0)
    return DYNAMIC_ATOL * peak, DYNAMIC_RTOL


def _compare_at(
    model: nn.Module, session: Any, sig: Signature, inputs: tuple[torch.Tensor, ...], dynamic: bool
) -> dict[str, Any]:
    """onnxruntime against PyTorch on ``inputs`` (another shape than the example's)."""
    shapes = [list(t.shape) for t in inputs]
    try:
        expected = _torch_outputs(model, inputs)
    except Exception as exc:  # the model itself is tied to the example's shape
        raise ShapeError(
            f"{type(model).__name__} does not run at input shapes {shapes} ({_first(exc)}), so"
            " its ONNX file cannot have dynamic axes"
        ) from None
    try:
        actual = session.run(None, _feeds(session, sig.input_names, inputs))
    except Exception as exc:  # onnxruntime raises its own types
        raise ShapeError(
            f"onnxruntime cannot run the file at input shapes {shapes}: {_first(exc)}"
        ) from None
    atol, rtol = _tolerance(expected, dynamic)
    check = compare_outputs(expected, actual, atol, rtol)
    if not check["ok"]:
        raise ShapeError(
            f"at input shapes {shapes} the ONNX file's output {check['worst_output']} differs"
            f" from PyTorch's by up to {check['max_abs_diff']:.3g} (tolerance {atol:.3g} +"
            f" {rtol} x |value|){'; ' + check['reason'] if check.get('reason') else ''}"
        )
    return check


def _first(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]


def _verify(
    model: nn.Module,
    sig: Signature,
    path: Path,
    exporter: str,
    dynamic: bool = False,
    layers: Sequence[dict[str, Any]] = (),
) -> dict[str, Any]:
    """Run ``path`` in onnxruntime on ``sig.inputs``; compare with PyTorch; time both. A file
    with dynamic axes is checked again at another batch size and sequence length
    (:func:`~slimtorch.export.onnx.signature.check_inputs`; :class:`ShapeError` if it differs).

    ``dynamic``: the model has int8 activations, checked with the looser end-to-end bound;
    ``layers`` lists its ONNX int8 layers (``lowbit_layers`` entries with ``activation`` and
    ``output``), each checked on its own first."""
    onnx, _ = _onnx_modules()
    try:
        session = _session(path)
    except Exception as exc:  # onnxruntime raises its own types
        raise OnnxExportError(
            f"onnxruntime cannot load the {exporter} export of {type(model).__name__}: {exc};"
            " try another --opset or the other exporter"
        ) from None
    feeds = _feeds(session, sig.input_names, sig.inputs)
    expected = _torch_outputs(model, sig.inputs)
    actual = session.run(None, feeds)
    layer_check: dict[str, Any] = {}
    if layers:
        layer_check = _check_layers(model, path, feeds, layers)
    atol, rtol = _tolerance(expected, dynamic)
    check = compare_outputs(expected, actual, atol, rtol)
    if not check["ok"]:
        raise OnnxExportError(
            f"the ONNX file ({exporter} exporter) computes different outputs than"
            f" {type(model).__name__}: {check.get('reason') or ''} output"
            f" {check['worst_output']} differs by up to {check['max_abs_diff']:.3g}"
            f" (tolerance {atol:.3g} + {rtol} x |value|); check the model's operators run the"
            " same in onnxruntime, or keep it as a slimtorch artifact"
        )
    checked = [[list(t.shape) for t in sig.inputs]]
    for inputs in check_inputs(sig):
        other = _compare_at(model, session, sig, inputs, dynamic)
        checked.append([list(t.shape) for t in inputs])
        for key in ("max_abs_diff", "tolerance_used"):
            check[key] = max(check[key], other[key])
    proto = onnx.load(str(path), load_external_data=False)
    ops: dict[str, int] = {}
    for node in proto.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    return {
        **{k: check[k] for k in ("max_abs_diff", "tolerance_used")},
        "atol": atol,
        "rtol": rtol,
        "checked_shapes": checked,
        **file_interface(proto.graph),
        "opset": next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None),
        "op_types": dict(sorted(ops.items(), key=lambda kv: -kv[1])),
        **layer_check,
        "outputs": [list(a.shape) for a in actual],
        "onnxruntime_ms": median_ms(lambda: session.run(None, feeds)),
        "torch_ms": _torch_ms(model, sig.inputs),
    }


def _check_layers(
    model: nn.Module, path: Path, feeds: dict[str, np.ndarray], layers: Sequence[dict[str, Any]]
) -> dict[str, Any]:
    """Each dynamic-int8 layer's onnxruntime output against the PyTorch layer run on the same
    input (onnxruntime's), within ``ATOL + RTOL * |value|``; raises when one differs."""
    onnx, _ = _onnx_modules()
    proto = onnx.load(str(path))
    names = [n for e in layers for n in (e["activation"], e["output"])]
    del proto.graph.output[:]
    proto.graph.output.extend(onnx.ValueInfoProto(name=n) for n in dict.fromkeys(names))
    session = _session(proto.SerializeToString())
    values = dict(zip(dict.fromkeys(names), session.run(None, feeds), strict=True))
    worst = {"max_abs_diff": 0.0, "tolerance_used": 0.0}
    for e in layers:
        layer = model.get_submodule(e["param"].removesuffix(".weight"))
        with torch.inference_mode():
            y = layer(torch.from_numpy(values[e["activation"]]))
            if not e["bias_added"] and getattr(layer, "bias", None) is not None:
                y = y - layer.bias
        check = compare_outputs([y.numpy()], [values[e["output"]]], ATOL, RTOL)
        if not check["ok"]:
            raise OnnxExportError(
                f"the ONNX int8 layer for {e['param']} computes different outputs than"
                f" {type(layer).__name__} on the same input: up to {check['max_abs_diff']:.3g}"
                f" (tolerance {ATOL} + {RTOL} x |value|); export without quantized=True or keep"
                " the model as a slimtorch artifact"
            )
        for k in worst:
            worst[k] = max(worst[k], check[k])
    return {
        "layer_max_abs_diff": worst["max_abs_diff"],
        "layer_tolerance_used": worst["tolerance_used"],
    }
