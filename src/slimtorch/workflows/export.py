"""Export an artifact for other runtimes (``slimtorch export DIR --to ... --out ...``).

Example inputs come from what the artifact records (builtin models, Hugging Face configs, or
the ``input`` shape recorded with ``slimtorch compress --input-shape``); the file written is
checked on them by :func:`slimtorch.export.export`. Importing this module stays light.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slimtorch.export import TARGETS, export, options_of

__all__ = ["TARGETS", "ExportOptions", "export_dir"]


@dataclass
class ExportOptions:
    """How :func:`export_dir` writes (``--batch``, ``--opset``, ``--dense``, ...)."""

    batch: int = 1  # batch size of the example inputs of builtin and Hugging Face models
    opset: int | None = None  # onnx: the opset version (None: the exporter's)
    dense: bool = False  # onnx: every weight as dense float
    strict: bool = False  # onnx: fail when a compressed weight cannot be stored low-bit
    decode: str = "load"  # onnx: "load" decodes low-bit weights at load time, "run" at every run
    static: bool = False  # onnx: fixed input shapes (default: dynamic batch and sequence axes)
    requantize: str | None = None  # gguf: the GGUF type for grids with no exact block type
    imatrix: str | Path | None = None  # gguf: importances weighting a k-quant mix's rounding
    force: bool = False  # replace ``out`` if it exists
    model: str | None = None  # the architecture of an artifact of a Python factory (a model spec)
    trust_factory: bool = False  # let the artifact's recorded factory run (trusted files only)


def export_dir(
    path: str | Path, to: str, out: str | Path, options: ExportOptions | None = None
) -> dict[str, Any]:
    """Load the artifact at ``path`` and export it to ``to`` at ``out``; the exporter's report."""
    from slimtorch import api
    from slimtorch.calibrate.inputs import example_inputs
    from slimtorch.core.errors import ConfigError, UnsupportedModelError, UserInputError
    from slimtorch.core.info import model_info
    from slimtorch.models.registry import load_model

    options = options or ExportOptions()
    if options.batch < 1:
        raise UserInputError(f"--batch must be at least 1, got {options.batch}")
    if options.requantize is not None and to != "gguf":
        raise UserInputError(f"--requantize applies to --to gguf, not --to {to}")
    if options.imatrix is not None and to != "gguf":
        raise ConfigError(
            f"--imatrix weights the rounding of a GGUF k-quant mix, not --to {to}: use --to gguf"
            " --requantize Q4_K_M (or another k-quant), or leave --imatrix out"
        )
    if options.imatrix is not None and not Path(options.imatrix).is_file():
        raise UserInputError(
            f"imatrix file {options.imatrix} does not exist; give llama-imatrix's .gguf or a"
            " .safetensors of per-input importances"
        )
    given = load_model(options.model).model if options.model else None
    model = api.load(api.require_dir(path), model=given, trust_factory=options.trust_factory)
    arch = model_info(model).architecture or {}
    # a builtin may be a transformers model too (builtin:smollm2-135m is a LlamaForCausalLM)
    is_transformers = type(model).__module__.startswith("transformers.")
    if (
        to in ("hf", "compressed-tensors", "gguf")
        and arch.get("kind") != "hf"
        and not is_transformers
    ):
        raise UnsupportedModelError(
            f"{path} holds a {arch.get('kind') or 'non-Hugging Face'} model"
            f" ({type(model).__name__}); --to {to} writes transformers models only: use"
            " --to onnx, or slimtorch.load"
        )
    inputs = example_inputs(model, options.batch, arch)
    if inputs is None:
        raise UserInputError(
            f"{path} records no example inputs for {type(model).__name__}: re-create it with"
            " `slimtorch compress ... --input-shape 1,3,224,224` (and --input-dtype), or call"
            " slimtorch.core.info.update_info(model, input={'shape': [...], 'dtype':"
            " 'float32'|'int64'}) before slimtorch.save"
        )
    all_options: dict[str, Any] = {
        "opset": options.opset,
        "quantized": not options.dense,
        "strict": options.strict,
        "decode": options.decode,
        "static": options.static,
        "requantize": options.requantize,
        "imatrix": options.imatrix,
    }
    taken = {k: v for k, v in all_options.items() if k in options_of(to)}
    return export(model, to, out, inputs=inputs, overwrite=options.force, **taken)
