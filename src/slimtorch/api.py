"""The Python API: compress, save, load, evaluate.

import slimtorch as st
loaded = st.models.load_model("builtin:lenet5-fashion")
result = st.compress(loaded.model, "sparse90-int8", data=task)
st.save(result.model, "out/")
model = st.load("out/")
"""

from __future__ import annotations

import copy
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from slimtorch.artifact.load import get_architecture, load_artifact, resized_entries
from slimtorch.artifact.load import get_metadata as get_metadata  # re-exported API
from slimtorch.artifact.load import set_architecture as set_architecture
from slimtorch.calibrate.inputs import example_inputs
from slimtorch.core.context import Context
from slimtorch.core.errors import ConfigError, UserInputError
from slimtorch.core.methods import Run, Task
from slimtorch.formats.artifact import write_artifact
from slimtorch.formats.sizes import artifact_bytes, dense_safetensors_bytes
from slimtorch.formats.state import iter_states
from slimtorch.recipe import Recipe, load_recipe
from slimtorch.runtime import RUNTIME_MODULES, linearize_conv1d

log = logging.getLogger(__name__)


@dataclass
class CompressResult:
    """The compressed model and a report of what each stage did."""

    model: nn.Module
    recipe: Recipe
    stages: list[dict[str, Any]] = field(default_factory=list)
    dense_bytes: int = 0


def compress(
    model: nn.Module,
    recipe: str | Path | dict[str, Any] | Recipe,
    data: Task | None = None,
    ctx: Context | None = None,
    inplace: bool = False,
) -> CompressResult:
    """Apply ``recipe``'s stages to (a copy of) ``model``.

    ``data`` is the training/calibration Task used by stages that need data; optional stages
    that need data are skipped with a warning when it is None.
    """
    ctx = ctx or Context()
    rec = load_recipe(recipe)
    if rec.needs_data and data is None:
        names = [s.spec.name for s in rec.stages if s.spec.needs_data and not s.optional]
        raise ConfigError(f"stages {names} need training data: pass --data (data= in Python)")
    dense = dense_safetensors_bytes(model.state_dict())
    work = model if inplace else copy.deepcopy(model)
    swapped = linearize_conv1d(work)  # GPT-2's Conv1D as Linear: every stage then finds it
    if swapped:
        log.info("%d Hugging Face Conv1D layers run as Linear (weights transposed)", len(swapped))
    run = Run(ctx, data, original=model if not inplace else copy.deepcopy(model).eval())
    report = []
    for i, stage in enumerate(rec.stages):
        name = stage.spec.name
        if stage.spec.needs_data and data is None:
            warnings.warn(f"stage {i + 1} ({name}) skipped: no training data given", stacklevel=2)
            report.append({"stage": i + 1, "method": name, "skipped": "no data"})
            continue
        log.info("stage %d: %s", i + 1, name)
        stage.spec.apply(work, stage.config, run)
        report.append({"stage": i + 1, "method": name})
    meta = get_metadata(work)
    recipe_dict = {k: v for k, v in rec.to_dict().items() if k != "description"}
    meta.update({"recipe": recipe_dict, "recipe_name": rec.name, "dense_bytes": dense})
    return CompressResult(work, rec, report, dense)


def _runtime_modules(model: nn.Module) -> list[dict[str, Any]]:
    out = []
    for name, module in model.named_modules():
        kind = type(module).__name__
        if kind in RUNTIME_MODULES and name:
            out.append({"name": name, "type": kind, "config": module.config()})  # type: ignore[operator]
    return out


def _architecture(model: nn.Module) -> dict[str, Any]:
    arch = get_architecture(model)
    if arch is not None:
        return arch
    cls = type(model)
    return {"kind": "factory", "ref": f"{cls.__module__}:{cls.__qualname__}"}


def save(
    model: nn.Module,
    path: str | Path,
    force: bool = False,
    metadata: dict[str, Any] | None = None,
    entropy: str | None = None,
) -> dict[str, Any]:
    """Write ``model`` as a compressed artifact at ``path``; returns the manifest.

    Refuses an existing ``path`` unless ``force``; never leaves a half-written directory.
    ``entropy`` ("none" or "huffman") defaults to the ``format`` of the recipe that compressed
    the model.
    """
    tensors = {k: v.detach() for k, v in model.state_dict().items()}
    states = {
        (f"{mname}.{param}" if mname else param): state
        for mname, _, param, state in iter_states(model)
    }
    meta = {**get_metadata(model), **(metadata or {})}
    meta.setdefault("dense_bytes", dense_safetensors_bytes(tensors))
    manifest = {
        "architecture": _architecture(model),
        "modules": _runtime_modules(model),
        "metadata": meta,
    }
    resized = resized_entries(model)
    if resized:
        manifest["resized"] = resized
    if entropy is None:
        entropy = str(meta.get("recipe", {}).get("format", {}).get("entropy", "none"))
    if entropy not in ("none", "huffman"):
        raise ConfigError(f"entropy must be 'none' or 'huffman', got {entropy!r}")
    return write_artifact(Path(path), tensors, states, manifest, force, entropy)


def load(path: str | Path, width: float | None = None, kernels: bool = False) -> nn.Module:
    """Rebuild the model saved at ``path``: no pickle, outputs identical to the saved model.

    ``width`` in (0, 1] serves a model compressed with ``prune.reorder`` on the first
    ``width`` of its channels in every group (its most important ones): smaller and faster.
    ``kernels=True`` runs int4 weight-only Linear layers (w4a16 presets) on torch's int4 CPU
    kernel: less memory and faster decoding, outputs within about 1e-2 relative.
    """
    return load_artifact(path, width, kernels)


def artifact_size(path: str | Path) -> int:
    return artifact_bytes(Path(path))


def example_inputs_for(
    model: nn.Module, architecture: dict[str, Any], batch: int
) -> tuple[Any, ...] | None:
    """Inputs for a latency run, when slimtorch knows the model's input."""
    return example_inputs(model, batch, architecture)


def require_dir(path: str | Path) -> Path:
    p = Path(path)
    if not p.is_dir():
        raise UserInputError(
            f"{p} is not a directory: give the --out directory of `slimtorch compress`"
        )
    return p


def evaluate(
    model: nn.Module,
    evaluator: str | None = None,
    data: str | None = None,
    ctx: Context | None = None,
    latency_batch: int = 1,
) -> dict[str, Any]:
    """Measure ``model``: parameters, nonzeros, latency (ms, median) and its quality metric.

    ``evaluator`` and ``data`` default to what the model's metadata records (builtin models
    record their own). Missing pieces are reported as None rather than guessed.
    """
    from slimtorch.eval.latency import measure_latency_ms
    from slimtorch.eval.quality import get_evaluator
    from slimtorch.eval.size import count_params

    ctx = ctx or Context(progress=False)
    meta = get_metadata(model)
    evaluator = evaluator or meta.get("evaluator")
    data = data or meta.get("data")
    params, nonzero = count_params(model)
    out: dict[str, Any] = {"params": params, "nonzero_params": nonzero}
    inputs = example_inputs_for(model, _architecture(model), latency_batch)
    out["latency_ms"] = measure_latency_ms(model, inputs) if inputs is not None else None
    out["latency_batch"] = latency_batch
    if evaluator:
        quality = get_evaluator(evaluator)(model, ctx, data)
        out.update(
            {
                "metric": quality.metric,
                "value": quality.value,
                "higher_is_better": quality.higher_is_better,
                **quality.extra,
            }
        )
    else:
        out.update({"metric": None, "value": None})
    return out
