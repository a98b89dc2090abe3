"""Export a (compressed) model to ONNX, and prove the file computes what the model computes.

:func:`export_onnx` runs ``torch.onnx.export`` with the ``torch.export``-based ("dynamo")
exporter and falls back to the TorchScript exporter when that fails, writes the file
atomically (a hidden sibling directory, fsynced, renamed into place), then loads it in
onnxruntime (CPUExecutionProvider) and compares every output with PyTorch's on the same
inputs: ``|ort - torch| <= ATOL + RTOL * |torch|`` elementwise. A failed export or check
raises :class:`OnnxExportError` naming the operator (and, when it can be found, the module)
and leaves nothing behind.

Compressed weights are then stored low-bit (``quantized=True``, the default): int8 codes,
4-bit codes two per byte, codebook indices; by default (``decode="load"``) they are decoded by
plain ops on initializers that onnxruntime constant-folds when it loads the file (small file,
float speed, dense float32 in memory); ``decode="run"`` uses DequantizeLinear / MatMulNBits
(low-bit in memory, decoded at every run). ``Int8DynamicLinear`` layers become MatMulInteger
with per-token int8 activations - see :mod:`slimtorch.export.onnx.quant`.
Pruning masks are not expressed: sparse weights stay dense float. The onnxruntime check and its
tolerances live in :mod:`slimtorch.export.onnx.verify` (its public names are re-exported here).
Axes: dynamic batch (and sequence for Transformers) by default, see
:mod:`slimtorch.export.onnx.signature`; ``static=True`` fixes them to the example inputs.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimtorch.core.errors import ArtifactError, UnsupportedModelError, UserInputError
from slimtorch.export.onnx.exporters import EXTERNAL_DATA_BYTES, _run_exporters
from slimtorch.export.onnx.signature import Signature, signature
from slimtorch.export.onnx.verify import (  # ATOL ... tensor_leaves: public, re-exported
    ATOL,
    RTOL,
    OnnxExportError,
    _forward_kwargs,
    _onnx_modules,
    _verify,
    compare_outputs,
    tensor_leaves,
)
from slimtorch.formats.atomic import fsync_dir, temp_sibling
from slimtorch.formats.state import iter_states

log = logging.getLogger(__name__)

_SIZE_KEYS = ("num_attention_heads", "num_key_value_heads", "head_dim", "intermediate_size")


def _check_inputs(inputs: Sequence[Any]) -> tuple[torch.Tensor, ...]:
    if not inputs or not all(isinstance(t, torch.Tensor) for t in inputs):
        raise UserInputError(
            "export_onnx needs a non-empty tuple of example input tensors (the model is called"
            " as model(*inputs)); build them with slimtorch.calibrate.inputs.example_inputs"
        )
    return tuple(inputs)


def _place(tmp: Path, out: Path, overwrite: bool) -> list[str]:
    """Move every file the exporter wrote next to ``out``, the ``.onnx`` file last."""
    files = sorted(tmp.iterdir(), key=lambda p: p.name == out.name)
    for f in files:
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
        target = out.parent / f.name
        if target.exists() and not overwrite:
            raise ArtifactError(f"{target} exists; pass --force / overwrite=True to replace it")
    for f in files:
        os.replace(f, out.parent / f.name)
    fsync_dir(out.parent)
    return [str(out.parent / f.name) for f in files]


def _lowbit(
    path: Path, twin: nn.Module, dynamic: list[Any], opset: int | None, strict: bool, decode: str
) -> dict[str, Any]:
    """Store the compressed weights of the file at ``path`` low-bit (slimtorch.export.onnx.quant)."""
    onnx, _ = _onnx_modules()
    from slimtorch.export.onnx.quant import quantize_onnx
    from slimtorch.export.onnx.sources import collect_sources

    sources, dense = collect_sources(twin)
    for d in dense:
        log.warning("ONNX export keeps %s dense float: %s", d["param"], d["reason"])
    proto = onnx.load(str(path))
    rewrite = quantize_onnx(proto, sources + dynamic, opset, strict, decode)
    if not rewrite.layers:
        return {"lowbit_layers": [], "dense_layers": dense + rewrite.dense, "dynamic_int8": False}
    external = sum(len(t.raw_data) for t in proto.graph.initializer) > EXTERNAL_DATA_BYTES
    for stale in path.parent.iterdir():
        stale.unlink()
    onnx.save(proto, str(path), save_as_external_data=external, location=f"{path.name}.data")
    return {
        "lowbit_layers": rewrite.layers,
        "dense_layers": dense + rewrite.dense,
        "dynamic_int8": rewrite.dynamic,
    }


@dataclass
class _Job:
    """What one export writes: the model, its exportable twin, and the options."""

    model: nn.Module
    twin: nn.Module
    dynamic: list[Any]  # Int8DynamicLinear sources (slimtorch.export.onnx.sources.float_twin)
    opset: int | None
    quantized: bool
    strict: bool
    decode: str


def _write(job: _Job, sig: Signature, path: Path) -> dict[str, Any]:
    """Export, store low-bit, verify: the report's fields that depend on the file."""
    exporter, fallback = _run_exporters(job.twin, sig, path, job.opset)
    dense_bytes = sum(f.stat().st_size for f in path.parent.iterdir())
    lowbit: dict[str, Any] = {}
    if job.quantized:
        lowbit = _lowbit(path, job.twin, job.dynamic, job.opset, job.strict, job.decode)
    layers = [e for e in lowbit.get("lowbit_layers", []) if "activation" in e]
    report = _verify(job.model, sig, path, exporter, bool(job.dynamic), layers)
    return {
        "dense_float_bytes": dense_bytes,
        "exporter": exporter,
        "dynamo_error": fallback,
        "lowbit_layers": lowbit.get("lowbit_layers", []),
        "dense_layers": lowbit.get("dense_layers", []),
        "input_names": sig.input_names,
        "output_names": sig.output_names,
        **report,
    }


def _write_dynamic_or_static(job: _Job, sig: Signature, path: Path) -> dict[str, Any]:
    """:func:`_write` with ``sig``'s dynamic axes; when that fails (the exporter, or the check
    at another shape), again with the example's fixed shapes, saying why."""
    if not sig.dynamic:
        return {**_write(job, sig, path), "dynamic_error": None}
    try:
        return {**_write(job, sig, path), "dynamic_error": None}
    except OnnxExportError as exc:
        why = str(exc)
    log.warning(
        "ONNX export with dynamic axes failed (%s); writing fixed shapes %s instead (pass"
        " --static / static=True to skip the dynamic attempt)",
        why,
        [list(t.shape) for t in sig.inputs],
    )
    for stale in path.parent.iterdir():
        stale.unlink()
    static = Signature(sig.inputs, sig.input_names, sig.output_names, sig.output_shapes)
    return {**_write(job, static, path), "dynamic_error": why}


def export_onnx(
    model: nn.Module,
    inputs: Sequence[Any],
    out_path: str | Path,
    opset: int | None = None,
    overwrite: bool = False,
    quantized: bool = True,
    strict: bool = False,
    decode: str = "load",
    *,
    static: bool = False,
) -> dict[str, Any]:
    """Export ``model`` (called as ``model(*inputs)``) to the ONNX file ``out_path``, verified.

    ``quantized`` stores compressed weights low-bit (int8/int4 DequantizeLinear, MatMulNBits,
    codebook Gather, MatMulInteger for dynamic int8 layers); a weight that cannot be expressed
    stays dense float with a warning, or raises :class:`OnnxExportError` when ``strict``.
    ``decode="load"`` (default) writes weight-only codes so that onnxruntime decodes them once
    when it loads the file (constant folding: small file, dense float32 in memory, float
    speed); ``decode="run"`` keeps them low-bit in memory (DequantizeLinear, MatMulNBits),
    decoded at every run - slower on onnxruntime 1.32 CPU. Both are exact.

    The file takes any batch size and, for Hugging Face Transformers, any sequence length, with
    the input names users know (:mod:`slimtorch.export.onnx.signature`), and is checked at a
    second batch size and sequence length; when that fails it is written with the example's
    fixed shapes instead (``dynamic_error`` says why). ``static=True``: fixed shapes only.

    Returns a JSON-able report: exporter used ("dynamo" or "torchscript" and why dynamo
    failed), opset, file bytes and the dense-float export's bytes, the low-bit layers and the
    dense ones (with reasons), input/output names and the file's dynamic axes, the shapes
    checked, the largest output differences against PyTorch (within ``atol + rtol * |value|``),
    onnxruntime and PyTorch latency (median ms, one thread).
    Raises :class:`OnnxExportError` when export or verification fails; nothing is left behind.
    """
    from slimtorch.export.onnx.batchnorm import batchnorm_as_affine
    from slimtorch.export.onnx.sources import float_twin

    tensors = _check_inputs(inputs)
    out = Path(out_path)
    if out.is_dir():
        raise ArtifactError(f"{out} is a directory; give the path of the .onnx file to write")
    if out.exists() and not overwrite:
        raise ArtifactError(f"{out} exists; pass --force / overwrite=True to replace it")
    _onnx_modules()
    states = iter_states(model)
    was_training = model.training
    model.eval()
    twin, dynamic = float_twin(model)  # Int8DynamicLinear -> Linear (exportable) + its codes
    kept: list[str] = []
    if quantized and states:  # keep BatchNorm out of the low-bit convolutions' weights
        twin, kept = batchnorm_as_affine(twin, copied=twin is not model)
    if states and not quantized:
        log.warning("%d compressed weights are exported as dense float values", len(states))
    job = _Job(model, twin, dynamic if quantized else [], opset, quantized, strict, decode)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(out)
    tmp.mkdir()
    try:
        with torch.inference_mode():
            outputs = model(*tensors, **_forward_kwargs(model))
        sig = signature(model, tensors, outputs, static)
        written = _write_dynamic_or_static(job, sig, tmp / out.name)
        nbytes = sum(f.stat().st_size for f in tmp.iterdir())
        files = _place(tmp, out, overwrite)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        model.train(was_training)
    log.info(
        "exported %s to %s with the %s exporter", type(model).__name__, out, written["exporter"]
    )
    return {
        "format": "onnx",
        "out": str(out),
        "files": files,
        "bytes": nbytes,
        "inputs": [
            {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")} for t in tensors
        ],
        "quantized": quantized,
        "static": static,
        "batchnorm_as_mul_add": kept,
        "dense_weights_from_states": len(states) if not quantized else len(written["dense_layers"]),
        **written,
    }


def export_hf_checked(
    model: nn.Module, inputs: Sequence[Any], out_dir: str | Path, overwrite: bool = False
) -> dict[str, Any]:
    """:func:`slimtorch.export.hf.export_hf`, then reload the directory with
    transformers' ``from_pretrained`` and compare its outputs with ``model``'s on ``inputs``
    (``ATOL + RTOL * |value|``); a directory that does not reload the same is removed."""
    from slimtorch.export.hf import export_hf
    from slimtorch.models import hf
    from slimtorch.runtime.int8 import Int8DynamicLinear

    int8 = [n for n, m in model.named_modules() if isinstance(m, Int8DynamicLinear)]
    if int8:
        raise UnsupportedModelError(
            "--to hf writes a float transformers model, which has no int8 activations:"
            f" {len(int8)} layers ({int8[0]}, ...) quantize their activations at run time (W8A8); export"
            " with --to onnx, or keep it as a slimtorch artifact (slimtorch.save / slimtorch.load)"
        )
    tensors = _check_inputs(inputs)
    path = export_hf(model, out_dir, overwrite)
    try:
        cls = getattr(hf._transformers(), type(model).__name__)
        attn = getattr(getattr(model, "config", None), "_attn_implementation", None)
        reloaded = cls.from_pretrained(path, local_files_only=True, attn_implementation=attn)
        kwargs = _forward_kwargs(model)
        with torch.inference_mode():
            expected = [t.numpy() for t in tensor_leaves(model.eval()(*tensors, **kwargs))]
            actual = [t.numpy() for t in tensor_leaves(reloaded.eval()(*tensors, **kwargs))]
        check = compare_outputs(expected, actual, ATOL, RTOL)
        if not check["ok"]:
            why = f"; {check['reason']}" if check.get("reason") else ""
            raise UnsupportedModelError(
                f"{path} reloaded by transformers computes different outputs than the compressed"
                f" model (up to {check['max_abs_diff']:.3g}{why}); keep"
                " it as a slimtorch artifact (slimtorch.save / slimtorch.load)"
            )
    except BaseException:
        shutil.rmtree(path, ignore_errors=True)
        raise
    config = reloaded.config
    return {
        "format": "hf",
        "out": str(path),
        "class": type(model).__name__,
        "files": sorted(f.name for f in path.iterdir()),
        "bytes": sum(f.stat().st_size for f in path.iterdir() if f.is_file()),
        "max_abs_diff": check["max_abs_diff"],
        "atol": ATOL,
        "rtol": RTOL,
        "params": sum(p.numel() for p in reloaded.parameters()),
        "sizes": {k: getattr(config, k) for k in _SIZE_KEYS if hasattr(config, k)},
    }
