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
with per-token int8 activations - see :mod:`slimtorch.models.onnx_quant`.
Pruning masks are not expressed: sparse weights stay dense float. Tolerances: weight-only files
decode to exactly the model's effective weights, so ``ATOL + RTOL * |value|`` holds (float
summation order only). Files with dynamic int8 activations compute the same per-token int8
arithmetic as ``Int8DynamicLinear``; each such layer is checked on its own (onnxruntime's
input to the layer fed to the PyTorch layer) within ``ATOL + RTOL * |value|``. End to end,
float ops between them (LayerNorm, softmax, LSTM) differ by float rounding, which moves an
activation across a rounding boundary now and then: a one-ulp change of MiniLM's first-layer
input moves the PyTorch model's own output by 5% of its peak. The whole model is therefore
checked with ``DYNAMIC_ATOL * max|output| + DYNAMIC_RTOL * |value|``.
Shapes are static: the file runs on inputs shaped like the example inputs.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import statistics
import time
import uuid
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.utils._pytree as pytree
from torch import nn

from slimtorch.core.errors import ArtifactError, UnsupportedModelError, UserInputError
from slimtorch.formats.atomic import fsync_dir
from slimtorch.formats.state import iter_states

log = logging.getLogger(__name__)

ATOL = 1e-4
RTOL = 1e-3
# End to end with dynamic int8 activations (every layer is also checked exactly, see above):
# float-rounding differences flip an activation code now and then, and each flip moves the
# output by one step. Measured: LeNet-5 b256 0.05% of the peak output, char-lstm b128 0.07%,
# MiniLM 5.3% (its own output moves 5% under a one-ulp input change, so no tighter bound holds).
DYNAMIC_ATOL = 0.05
DYNAMIC_RTOL = 0.05
EXTERNAL_DATA_BYTES = 1_500_000_000  # protobuf caps a file at 2 GiB: larger weights go beside
_SIZE_KEYS = ("num_attention_heads", "num_key_value_heads", "head_dim", "intermediate_size")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_OP_PATTERNS = (
    re.compile(r"operator '([\w:.]+)'"),
    re.compile(r"OpOverload\(op='([\w.]+)'"),
    re.compile(r"target=torch\.ops\.([\w.]+)"),
)


class OnnxExportError(UnsupportedModelError):
    """The model could not be exported to ONNX, or the file computes something else."""


def _onnx_modules() -> tuple[Any, Any]:
    try:
        import onnx
        import onnxruntime
    except ImportError:
        raise UserInputError(
            "ONNX export needs onnx and onnxruntime: `pip install 'slimtorch[onnx]'`"
        ) from None
    return onnx, onnxruntime


class _TensorOutputs(nn.Module):
    """``model(*inputs, **kwargs)`` with its outputs flattened to a tuple of tensors."""

    def __init__(self, model: nn.Module, kwargs: dict[str, Any]) -> None:
        super().__init__()
        self.model = model
        self.kwargs = kwargs

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tensor_leaves(self.model(*inputs, **self.kwargs))


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


def _median_ms(fn: Callable[[], Any], budget_s: float = 2.0, max_repeats: int = 20) -> float:
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
            return _median_ms(lambda: model(*inputs, **_forward_kwargs(model)))
    finally:
        torch.set_num_threads(threads)


def _verify(
    model: nn.Module,
    inputs: tuple[torch.Tensor, ...],
    path: Path,
    exporter: str,
    dynamic: bool = False,
    layers: Sequence[dict[str, Any]] = (),
) -> dict[str, Any]:
    """Run ``path`` in onnxruntime on ``inputs``; compare with PyTorch; time both.

    ``dynamic``: the model has int8 activations, checked with the looser end-to-end bound;
    ``layers`` lists its ONNX int8 layers (``lowbit_layers`` entries with ``activation`` and
    ``output``), each checked on its own first."""
    onnx, ort = _onnx_modules()
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own types
        raise OnnxExportError(
            f"onnxruntime cannot load the {exporter} export of {type(model).__name__}: {exc};"
            " try another --opset or the other exporter"
        ) from None
    feeds_all = {f"input_{i}": t.detach().cpu().numpy() for i, t in enumerate(inputs)}
    feeds = {i.name: feeds_all[i.name] for i in session.get_inputs()}
    with torch.inference_mode():
        expected = [
            t.cpu().numpy() for t in tensor_leaves(model(*inputs, **_forward_kwargs(model)))
        ]
    actual = session.run(None, feeds)
    atol, rtol = ATOL, RTOL
    layer_check: dict[str, Any] = {}
    if layers:
        layer_check = _check_layers(model, path, feeds, layers)
    if dynamic:
        peak = max((float(np.abs(e).max()) for e in expected if e.size), default=1.0)
        atol, rtol = DYNAMIC_ATOL * peak, DYNAMIC_RTOL
    check = compare_outputs(expected, actual, atol, rtol)
    if not check["ok"]:
        raise OnnxExportError(
            f"the ONNX file ({exporter} exporter) computes different outputs than"
            f" {type(model).__name__}: {check.get('reason') or ''} output"
            f" {check['worst_output']} differs by up to {check['max_abs_diff']:.3g}"
            f" (tolerance {atol:.3g} + {rtol} x |value|); check the model's operators run the"
            " same in onnxruntime, or keep it as a slimtorch artifact"
        )
    proto = onnx.load(str(path), load_external_data=False)
    ops: dict[str, int] = {}
    for node in proto.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    return {
        **{k: check[k] for k in ("max_abs_diff", "tolerance_used")},
        "atol": atol,
        "rtol": rtol,
        "opset": next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None),
        "op_types": dict(sorted(ops.items(), key=lambda kv: -kv[1])),
        **layer_check,
        "outputs": [list(a.shape) for a in actual],
        "onnxruntime_ms": _median_ms(lambda: session.run(None, feeds)),
        "torch_ms": _torch_ms(model, inputs),
    }


def _check_layers(
    model: nn.Module, path: Path, feeds: dict[str, np.ndarray], layers: Sequence[dict[str, Any]]
) -> dict[str, Any]:
    """Each dynamic-int8 layer's onnxruntime output against the PyTorch layer run on the same
    input (onnxruntime's), within ``ATOL + RTOL * |value|``; raises when one differs."""
    onnx, ort = _onnx_modules()
    proto = onnx.load(str(path))
    names = [n for e in layers for n in (e["activation"], e["output"])]
    del proto.graph.output[:]
    proto.graph.output.extend(onnx.ValueInfoProto(name=n) for n in dict.fromkeys(names))
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(
        proto.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
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
    """Store the compressed weights of the file at ``path`` low-bit (slimtorch.models.onnx_quant)."""
    onnx, _ = _onnx_modules()
    from slimtorch.models.onnx_quant import quantize_onnx
    from slimtorch.models.onnx_sources import collect_sources

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
    from slimtorch.models.onnx_sources import float_twin

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
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:12]}"
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
    """:func:`slimtorch.models.hf_export.export_hf`, then reload the directory with
    transformers' ``from_pretrained`` and compare its outputs with ``model``'s on ``inputs``
    (``ATOL + RTOL * |value|``); a directory that does not reload the same is removed."""
    from slimtorch.models import hf
    from slimtorch.models.hf_export import export_hf

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
            raise UnsupportedModelError(
                f"{path} reloaded by transformers computes different outputs than the pruned"
                f" model (up to {check['max_abs_diff']:.3g}; {check.get('reason') or ''}); keep"
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
