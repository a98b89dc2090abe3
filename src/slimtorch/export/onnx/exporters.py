"""Run ``torch.onnx.export``: the dynamo exporter, else the TorchScript one, with the file's
input/output names and dynamic axes (:class:`~slimtorch.export.onnx.signature.Signature`); when
both fail, one error naming the operator (and the module calling it, when it can be found).
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimtorch.export.onnx.signature import Signature
from slimtorch.export.onnx.verify import OnnxExportError, _forward_kwargs, tensor_leaves

log = logging.getLogger(__name__)

EXTERNAL_DATA_BYTES = 1_500_000_000  # protobuf caps a file at 2 GiB: larger weights go beside
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


def strip_node_metadata(path: Path) -> None:
    """Drop the per-node metadata the dynamo exporter writes (each node's Python stack trace
    with this machine's paths, module hierarchy and FX node: most of a small model's file and
    nothing any runtime reads); external weight files are left as they are."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    graphs = [proto.graph]
    found = 0
    while graphs:
        graph = graphs.pop()
        for node in graph.node:
            found += len(node.metadata_props)
            del node.metadata_props[:]
            graphs += [a.g for a in node.attribute if a.HasField("g")]
            graphs += [g for a in node.attribute for g in a.graphs]
    for function in proto.functions:
        for node in function.node:
            found += len(node.metadata_props)
            del node.metadata_props[:]
    if found:
        onnx.save(proto, str(path))


def _run_exporters(
    model: nn.Module, sig: Signature, path: Path, opset: int | None
) -> tuple[str, str | None]:
    """Write ``path`` with the first exporter that works; returns (its name, why dynamo failed)."""
    wrapper = _TensorOutputs(model, _forward_kwargs(model)).eval()
    external = sum(p.numel() * p.element_size() for p in model.parameters()) > EXTERNAL_DATA_BYTES
    errors: dict[str, Exception] = {}
    for name, dynamo in (("dynamo", True), ("torchscript", False)):
        axes: dict[str, Any] = {}
        if sig.dynamic:
            axes = (
                {"dynamic_shapes": sig.dynamic_shapes()}
                if dynamo
                else {"dynamic_axes": sig.dynamic_axes()}
            )
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX")
                warnings.filterwarnings("ignore", message=".*_flat_weights.* during export")
                warnings.filterwarnings("ignore", message=".*axis name.*will not be used")
                torch.onnx.export(
                    wrapper,
                    sig.trace_inputs(),
                    str(path),
                    dynamo=dynamo,
                    opset_version=opset,
                    input_names=sig.input_names,
                    output_names=sig.output_names,
                    external_data=external,
                    verbose=False,
                    **axes,
                )
        except Exception as exc:  # every exporter failure is reported together
            log.info("%s ONNX exporter failed: %s", name, _summary(exc))
            errors[name] = exc
            for stale in path.parent.iterdir():
                stale.unlink()
            continue
        strip_node_metadata(path)
        reason = _summary(errors["dynamo"]) if errors else None
        if reason:
            log.warning("dynamo ONNX exporter failed (%s); used the TorchScript exporter", reason)
        return name, reason
    raise OnnxExportError(_export_error(model, sig.inputs, errors))
