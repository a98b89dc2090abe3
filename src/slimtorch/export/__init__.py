"""Exporters: a slimtorch model to the files other runtimes load, behind one function.

    from slimtorch.export import export
    export(model, to="onnx", out="model.onnx")                # checked in onnxruntime
    export(model, to="hf", out="model-hf/")                   # transformers reloads it
    export(model, to="compressed-tensors", out="model-ct/")   # packed int4/int8 weights
    export(model, to="gguf", out="model.gguf")                # llama.cpp, checked there

Each exporter verifies what it wrote against the model on example inputs: ``inputs=`` or, by
default, the ones slimtorch knows for the model (its recorded ``input``, a builtin's, or a
Hugging Face config's). Adding an exporter: a module in this package and one entry in
:data:`EXPORTERS`. Importing this package stays light: each exporter is imported when called.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from slimtorch.core.errors import ConfigError, UserInputError
from slimtorch.core.registry import Registry

if TYPE_CHECKING:
    from torch import nn

Exporter = Callable[..., dict[str, Any]]

EXPORTERS: Registry[Exporter] = Registry("export target")


def _onnx(
    model: nn.Module,
    inputs: Sequence[Any],
    out: str | Path,
    overwrite: bool = False,
    *,
    opset: int | None = None,
    quantized: bool = True,
    strict: bool = False,
    decode: str = "load",
    static: bool = False,
) -> dict[str, Any]:
    """ONNX file, checked in onnxruntime (:func:`slimtorch.export.onnx.export.export_onnx`);
    dynamic batch (and sequence) axes unless ``static``."""
    from slimtorch.export.onnx.export import export_onnx

    return export_onnx(
        model, inputs, out, opset, overwrite, quantized, strict, decode, static=static
    )


def _hf(
    model: nn.Module, inputs: Sequence[Any], out: str | Path, overwrite: bool = False
) -> dict[str, Any]:
    """transformers directory, reloaded and compared
    (:func:`slimtorch.export.onnx.export.export_hf_checked`)."""
    from slimtorch.export.onnx.export import export_hf_checked

    return export_hf_checked(model, inputs, out, overwrite)


def _compressed_tensors(
    model: nn.Module, inputs: Sequence[Any], out: str | Path, overwrite: bool = False
) -> dict[str, Any]:
    """compressed-tensors ``pack-quantized`` directory
    (:func:`slimtorch.export.compressed_tensors.export_checked`)."""
    from slimtorch.export.compressed_tensors import export_checked

    return export_checked(model, inputs, out, overwrite)


def _gguf(
    model: nn.Module,
    inputs: Sequence[Any],
    out: str | Path,
    overwrite: bool = False,
    *,
    requantize: str | None = None,
    imatrix: str | Path | None = None,
) -> dict[str, Any]:
    """GGUF file for llama.cpp, read back and checked in llama.cpp when installed
    (:func:`slimtorch.export.gguf.export_gguf`); ``imatrix`` weights a k-quant mix's rounding."""
    from slimtorch.export.gguf import export_gguf

    return export_gguf(model, inputs, out, overwrite, requantize, imatrix=imatrix)


def _openvino(
    model: nn.Module, inputs: Sequence[Any], out: str | Path, overwrite: bool = False
) -> dict[str, Any]:
    """OpenVINO IR (.xml + .bin) keeping low-bit weights compressed, run in its CPU plugin
    (:func:`slimtorch.export.openvino.export_openvino`)."""
    from slimtorch.export.openvino import export_openvino

    return export_openvino(model, inputs, out, overwrite)


def _coreml(
    model: nn.Module, inputs: Sequence[Any], out: str | Path, overwrite: bool = False
) -> dict[str, Any]:
    """Core ML .mlpackage with k-means codebooks as LUT weights and int8/int4 as blockwise
    quantized weights, read back and checked (Core ML cannot run on Linux)
    (:func:`slimtorch.export.coreml.export_coreml`)."""
    from slimtorch.export.coreml import export_coreml

    return export_coreml(model, inputs, out, overwrite)


def _executorch(  # H-ET
    model: nn.Module,
    inputs: Sequence[Any],
    out: str | Path,
    overwrite: bool = False,
    *,
    quantized: bool = True,
) -> dict[str, Any]:
    """ExecuTorch .pte with the XNNPACK backend, our int8/4-bit codes lowered as they are (dynamic
    int8 activations), run in ExecuTorch's runtime
    (:func:`slimtorch.export.executorch.export_executorch`); ``quantized=False``: all fp32."""
    from slimtorch.export.executorch import export_executorch

    return export_executorch(model, inputs, out, overwrite, quantized=quantized)


EXPORTERS.add("onnx", _onnx)
EXPORTERS.add("hf", _hf)
EXPORTERS.add("compressed-tensors", _compressed_tensors)
EXPORTERS.add("gguf", _gguf)
EXPORTERS.add("executorch", _executorch)  # H-ET
EXPORTERS.add("openvino", _openvino)  # H-OVCM
EXPORTERS.add("coreml", _coreml)  # H-OVCM

TARGETS: tuple[str, ...] = ("onnx", "hf", "compressed-tensors", "gguf")  # in the order --help shows
TARGETS += ("openvino", "coreml")  # H-OVCM
TARGETS += ("executorch",)  # H-ET


def options_of(to: str) -> list[str]:
    """The keyword options the exporter ``to`` takes besides model, inputs, out, overwrite."""
    params = inspect.signature(EXPORTERS.get(to)).parameters
    return [n for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY]


def export(
    model: nn.Module,
    to: str,
    out: str | Path,
    *,
    inputs: Sequence[Any] | None = None,
    batch: int = 1,
    overwrite: bool = False,
    **options: Any,
) -> dict[str, Any]:
    """Export ``model`` to the format ``to`` (one of :data:`TARGETS`) at ``out``, verified.

    ``inputs`` are the example inputs the written file is checked on (default: the ones
    slimtorch knows for ``model``, with batch size ``batch``). ``options`` go to the exporter
    (``onnx``: ``opset``, ``quantized``, ``strict``, ``decode``, ``static``; ``gguf``: ``requantize``,
    ``imatrix``).
    Returns the exporter's JSON-able report; raises :class:`ConfigError` for an unknown ``to``
    or option.
    """
    exporter = EXPORTERS.get(to)  # unknown: "unknown export target ...; Known ...: ..."
    unknown = sorted(set(options) - set(options_of(to)))
    if unknown:
        valid = ", ".join(options_of(to)) or "none"
        raise ConfigError(f"export to {to!r} has no option {unknown[0]!r}; its options: {valid}")
    if inputs is None:
        from slimtorch.calibrate.inputs import example_inputs

        if batch < 1:
            raise UserInputError(f"batch must be at least 1, got {batch}")
        inputs = example_inputs(model, batch)
        if inputs is None:
            raise UserInputError(
                f"slimtorch knows no example inputs for {type(model).__name__}: pass inputs=..."
                " (a tuple of tensors the model is called with)"
            )
    return exporter(model, inputs, out, overwrite, **options)
