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
Shapes are static: the file runs on inputs shaped like the example inputs.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimtorch.core.errors import ArtifactError, UnsupportedModelError, UserInputError
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

EXTERNAL_DATA_BYTES = 1_500_000_000  # protobuf caps a file at 2 GiB: larger weights go beside
_SIZE_KEYS = ("num_attention_heads", "num_key_value_heads", "head_dim", "intermediate_size")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_OP_PATTERNS = (
    re.compile(r"operator '([\w:.]+)'"),
    re.compile(r"OpOverload\(op='([\w.]+)'"),
    re.compile(r"target=torch\.ops\.([\w.]+)"),
)


class _TensorOutputs(nn.Module):
    """``model(*inputs, **kwargs)`` with its outputs flattened to a tuple of tensors."""

    def __init__(self, model: nn.Module, kwargs: dict[str, Any]) -> None:
        super().__init__()
        self.model = model
        self.kwargs = kwargs

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tensor_leaves(self.model(*inputs, **self.kwargs))


def _summary(exc: BaseException) -> str:
    """The informative line of an exporter error (the dynamo exporter's exception summary)."""
    lines = [_ANSI.sub("", line).strip() for line in str(exc).splitlines() if line.strip()]
    summary = next((line for line in lines if line.startswith("<class '")), None)
    if summary:  # "<class 'pkg.mod.Error'>: message" -> "Error: message"
        summary = re.sub(r"^<class '(?:[\w]+\.)*(\w+)'>", r"\1", summary)
    return (summary or (lines[0] if lines else type(exc).__name__))[:300]


def _operator(errors: Sequence[BaseException]) -> str | None:
    """The operator an exporter could not translate (aten names preferred), if it says."""
    text = " ".join(str(e) for exc in errors for e in (exc, exc.__cause__) if e is not None)
    found = [m.removesuffix(".default") for p in _OP_PATTERNS for m in p.findall(text)]
    return next((o for o in found if o.startswith("aten")), found[0] if found else None)


def _module_of(model: nn.Module, inputs: tuple[Any, ...], op: str) -> str | None:
    """The module whose forward calls ``op`` (from torch.export's module stack), if found."""
    base = re.split(r"::|\.", op.removesuffix(".default"))[-1]
    try:
        program = torch.export.export(model, inputs, strict=False)
    except Exception:  # best effort: the caller reports the export error
        return None
    for node in program.graph.nodes:
        stack = node.meta.get("nn_module_stack")
        if node.op == "call_function" and base in str(node.target) and stack:
            path, cls = list(stack.values())[-1]
            name = str(path).removeprefix("L['self'].").removeprefix("model.")
            kind = getattr(cls, "__name__", str(cls).rpartition(".")[2])
            return f"{name} ({kind})" if name else None
    return None


def _export_error(model: nn.Module, inputs: tuple[Any, ...], errors: dict[str, Exception]) -> str:
    op = _operator(list(errors.values()))
    module = _module_of(model, inputs, op) if op else None
    where = f"operator {op}" + (f" in module {module}" if module else "") if op else "the model"
    tried = "; ".join(f"{k} exporter: {_summary(e)}" for k, e in errors.items())
    return (
        f"ONNX export of {type(model).__name__} failed at {where} ({tried}). Replace that"
        " operation with ONNX-exportable ones, try another --opset, or keep the model as a"
        " slimtorch artifact (slimtorch.save / slimtorch.load)"
    )


def _run_exporters(
    model: nn.Module, inputs: tuple[torch.Tensor, ...], path: Path, opset: int | None
) -> tuple[str, str | None]:
    """Write ``path`` with the first exporter that works; returns (its name, why dynamo failed)."""
    wrapper = _TensorOutputs(model, _forward_kwargs(model)).eval()
    names = [f"input_{i}" for i in range(len(inputs))]
    external = sum(p.numel() * p.element_size() for p in model.parameters()) > EXTERNAL_DATA_BYTES
    errors: dict[str, Exception] = {}
    for name, dynamo in (("dynamo", True), ("torchscript", False)):
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX")
                warnings.filterwarnings("ignore", message=".*_flat_weights.* during export")
                torch.onnx.export(
                    wrapper,
                    inputs,
                    str(path),
                    dynamo=dynamo,
                    opset_version=opset,
                    input_names=names,
                    external_data=external,
                    verbose=False,
                )
        except Exception as exc:  # every exporter failure is reported together
            log.info("%s ONNX exporter failed: %s", name, _summary(exc))
            errors[name] = exc
            for stale in path.parent.iterdir():
                stale.unlink()
            continue
        reason = _summary(errors["dynamo"]) if errors else None
        if reason:
            log.warning("dynamo ONNX exporter failed (%s); used the TorchScript exporter", reason)
        return name, reason
    raise OnnxExportError(_export_error(model, inputs, errors))


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


def export_onnx(
    model: nn.Module,
    inputs: Sequence[Any],
    out_path: str | Path,
    opset: int | None = None,
    overwrite: bool = False,
    quantized: bool = True,
    strict: bool = False,
    decode: str = "load",
) -> dict[str, Any]:
    """Export ``model`` (called as ``model(*inputs)``) to the ONNX file ``out_path``, verified.

    ``quantized`` stores compressed weights low-bit (int8/int4 DequantizeLinear, MatMulNBits,
    codebook Gather, MatMulInteger for dynamic int8 layers); a weight that cannot be expressed
    stays dense float with a warning, or raises :class:`OnnxExportError` when ``strict``.
    ``decode="load"`` (default) writes weight-only codes so that onnxruntime decodes them once
    when it loads the file (constant folding: small file, dense float32 in memory, float
    speed); ``decode="run"`` keeps them low-bit in memory (DequantizeLinear, MatMulNBits),
    decoded at every run - slower on onnxruntime 1.32 CPU. Both are exact.

    Returns a JSON-able report: exporter used ("dynamo" or "torchscript" and why dynamo
    failed), opset, file bytes and the dense-float export's bytes, the low-bit layers and the
    dense ones (with reasons), the largest output differences against PyTorch (within
    ``atol + rtol * |value|``), onnxruntime and PyTorch latency (median ms, one thread).
    Raises :class:`OnnxExportError` when export or verification fails; nothing is left behind.
    """
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
    if states and not quantized:
        log.warning("%d compressed weights are exported as dense float values", len(states))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(out)
    tmp.mkdir()
    try:
        exporter, fallback = _run_exporters(twin, tensors, tmp / out.name, opset)
        dense_bytes = sum(f.stat().st_size for f in tmp.iterdir())
        lowbit = (
            _lowbit(tmp / out.name, twin, dynamic if quantized else [], opset, strict, decode)
            if quantized
            else {}
        )
        layers = [e for e in lowbit.get("lowbit_layers", []) if "activation" in e]
        report = _verify(model, tensors, tmp / out.name, exporter, bool(dynamic), layers)
        nbytes = sum(f.stat().st_size for f in tmp.iterdir())
        files = _place(tmp, out, overwrite)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        model.train(was_training)
    log.info("exported %s to %s with the %s exporter", type(model).__name__, out, exporter)
    return {
        "format": "onnx",
        "out": str(out),
        "files": files,
        "bytes": nbytes,
        "dense_float_bytes": dense_bytes,
        "exporter": exporter,
        "dynamo_error": fallback,
        "inputs": [
            {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")} for t in tensors
        ],
        "quantized": quantized,
        "dense_weights_from_states": len(states)
        if not quantized
        else len(lowbit.get("dense_layers", [])),
        "lowbit_layers": lowbit.get("lowbit_layers", []),
        "dense_layers": lowbit.get("dense_layers", []),
        **report,
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
