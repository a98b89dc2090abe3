"""Write the two parts of a split as ONNX files and check them in onnxruntime.

``device.onnx`` takes the model's inputs and returns the tensors crossing the cut;
``server.onnx`` takes those and returns the model's outputs. Each part is exported and checked
on its own by :func:`slimtorch.export.onnx.export.export_onnx` (float, dynamic batch axis, as
``slimtorch export`` writes); with ``int8`` the link codec is then added to both files
(:mod:`slimtorch.search.split_codec`). Finally device -> server runs in onnxruntime and is
compared with the same two parts in PyTorch (``check``: within ``ATOL + RTOL * |value|``
without the codec, else an error; with it the error the int8 link adds is measured and
reported) and with the whole uncompressed model (``check_vs_whole_model``: the same unless
``--recipe`` compressed the device part).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import fx, nn

from slimtorch.export.onnx.export import export_onnx
from slimtorch.export.onnx.verify import (
    ATOL,
    RTOL,
    OnnxExportError,
    compare_outputs,
    tensor_leaves,
)
from slimtorch.search.split_graph import batchnorm_as_affine
from slimtorch.search.split_measure import ort_ms, ort_run, ort_session


@dataclass
class Parts:
    """The two halves (``None`` where that side runs nothing) and whether the link is int8."""

    device: nn.Module | None
    server: nn.Module | None
    int8: bool
    codes_from: nn.Module | None = None  # the compressed model whose codes the device file keeps


def _lowbit(proto: Any, compressed: nn.Module, module: nn.Module) -> int:
    """Store the compressed weights of ``compressed`` that the part ``module`` holds (``proto``
    its file) low-bit, matched by value: the part's weights are their effective values."""
    from slimtorch.export.onnx.quant import quantize_onnx
    from slimtorch.export.onnx.sources import collect_sources

    held = {n for n, _ in module.named_parameters()} | {n for n, _ in module.named_buffers()}
    found = collect_sources(compressed)[0]
    sources = [s for s in found if not s.dynamic and s.param in held]
    return len(quantize_onnx(proto, sources, None, False, "load").layers) if sources else 0


def _export(
    module: nn.Module,
    inputs: tuple[torch.Tensor, ...],
    path: Path,
    codec: str | None,
    codes_from: nn.Module | None = None,
) -> dict[str, Any]:
    import onnx

    if codes_from is not None and isinstance(module, fx.GraphModule):
        batchnorm_as_affine(module)  # else folded into the convolutions' low-bit weights
    report = export_onnx(module.eval(), inputs, path)
    coded: list[str] = []
    lowbit = 0
    if codec is not None or codes_from is not None:
        from slimtorch.search.split_codec import add_decoder, add_encoder

        proto = onnx.load(str(path))
        if codes_from is not None:
            lowbit = _lowbit(proto, codes_from, module)
        if codec is not None:
            coded = add_encoder(proto) if codec == "encode" else add_decoder(proto)
        onnx.checker.check_model(proto)
        for stale in path.parent.glob(f"{path.name}*"):
            stale.unlink()
        onnx.save(proto, str(path))
    keys = ("exporter", "max_abs_diff", "dynamic_axes", "dynamic_error")
    return {k: report.get(k) for k in keys} | {
        "file": path.name,
        "bytes": sum(f.stat().st_size for f in path.parent.glob(f"{path.name}*")),
        "int8_coded": coded,
        "lowbit_weights": lowbit,
    }


def _error(expected: list[np.ndarray], actual: list[np.ndarray]) -> dict[str, Any]:
    check = compare_outputs(expected, actual, ATOL, RTOL)
    peak = max(float(np.abs(e).max()) for e in expected) if expected else 0.0
    e, a = expected[0].astype(np.float64).ravel(), actual[0].astype(np.float64).ravel()
    norms = float(np.linalg.norm(e) * np.linalg.norm(a))
    cosine = float(e @ a) / max(norms, 1e-30)
    return {
        "within_tolerance": bool(check["ok"]),
        "atol": ATOL,
        "rtol": RTOL,
        "max_abs_diff": check["max_abs_diff"],
        "max_abs_diff_over_peak": check["max_abs_diff"] / peak if peak else None,
        "cosine_first_output": cosine,
    }


def export_and_check(
    model: nn.Module, parts: Parts, inputs: tuple[torch.Tensor, ...], tmp: Path
) -> dict[str, Any]:
    """Export the parts into ``tmp``, run device -> server in onnxruntime on ``inputs``, and
    compare with ``model``; returns files, measured milliseconds and bytes, and the error."""
    with torch.inference_mode():
        whole = [t.numpy() for t in tensor_leaves(model(*inputs))]
        crossing = tuple(parts.device(*inputs)) if parts.device is not None else inputs
        ends = tuple(parts.server(*crossing)) if parts.server is not None else crossing
        expected = [t.numpy() for t in ends]  # the split model in PyTorch (compressed device)
    report: dict[str, Any] = {"files": {}}
    values = [t.numpy() for t in inputs]
    device_ms = server_ms = 0.0
    if parts.device is not None:
        codec = "encode" if parts.int8 else None
        report["files"]["device"] = _export(
            parts.device, inputs, tmp / "device.onnx", codec, parts.codes_from
        )
        session = ort_session(tmp / "device.onnx")
        report["device_outputs"] = [o.name for o in session.get_outputs()]
        device_ms = ort_ms(session, values)
        values = ort_run(session, values)
    sent = int(sum(np.asarray(v).nbytes for v in values))
    if parts.server is not None:
        codec = "decode" if parts.int8 else None
        report["files"]["server"] = _export(parts.server, crossing, tmp / "server.onnx", codec)
        session = ort_session(tmp / "server.onnx")
        report["server_inputs"] = [i.name for i in session.get_inputs()]  # device_outputs' order
        server_ms = ort_ms(session, values)
        values = ort_run(session, values)
    check = _error(expected, [np.asarray(v) for v in values])
    if not parts.int8 and not check["within_tolerance"]:
        raise OnnxExportError(
            f"device -> server in onnxruntime differs from the same parts in PyTorch by up to"
            f" {check['max_abs_diff']:.3g} (tolerance {ATOL} + {RTOL} x |value|); the cut is"
            " not exact: choose another with --cut, or report the model"
        )
    report["check_vs_whole_model"] = _error(whole, [np.asarray(v) for v in values])
    report.update(
        {
            "measured_device_ms_here": device_ms,
            "measured_server_ms_here": server_ms,
            "sent_bytes": sent,
            "check": check,
        }
    )
    return report
