"""The Python API: compress, save, load, evaluate.

import slimtorch as st
from slimtorch.quantize import RTNConfig
result = st.compress(model, "sparse90-int8", data=loader, loss_fn=F.cross_entropy)
result = st.compress(model, [RTNConfig(bits=4)])        # or a YAML path, a dict, a Recipe
st.save(result.model, "out/")
model = st.load("out/")
"""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from slimtorch.artifact.load import ModelOrFactory, load_artifact
from slimtorch.artifact.save import architecture_of, save_artifact
from slimtorch.calibrate.inputs import example_inputs
from slimtorch.calibrate.loader import LossFn, as_task
from slimtorch.core.context import Context
from slimtorch.core.errors import ConfigError, UserInputError
from slimtorch.core.info import MetadataView, model_info, update_info
from slimtorch.core.methods import Run, Task
from slimtorch.formats.sizes import artifact_bytes, dense_safetensors_bytes
from slimtorch.recipe import Recipe, load_recipe
from slimtorch.recipe.recipe import RecipeLike
from slimtorch.runtime import linearize_conv1d
from slimtorch.runtime.moe import unfuse_experts

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
    recipe: RecipeLike,
    data: Task | Iterable[Any] | None = None,
    ctx: Context | None = None,
    inplace: bool = False,
    loss_fn: LossFn | None = None,
) -> CompressResult:
    """Apply ``recipe``'s stages to (a copy of) ``model``.

    ``recipe``: a preset name (``"sparse90-int8"``), a YAML path, a dict, a Recipe, a stage
    config (``RTNConfig(bits=4)``) or a list of stage configs and stage dicts.

    ``data`` feeds the stages that calibrate or train: a torch ``DataLoader`` (or any
    re-iterable of batches) with ``loss_fn(output, targets)`` for the stages that train, or a
    Task. Batches are ``(inputs, targets)``, dicts (Hugging Face style, the model's own loss
    from ``labels`` when there is no ``loss_fn``) or bare input tensors (calibration only); the
    loader's batch size wins over a stage's ``batch_size`` (see calibrate/loader.py).
    Calibration-only stages (GPTQ, AWQ, Wanda, ...) need no ``loss_fn``. Optional stages that
    need data are skipped with a warning when ``data`` is None.
    """
    ctx = ctx or Context()
    rec = load_recipe(recipe)
    if data is None and loss_fn is not None:
        raise ConfigError("loss_fn is given without data: pass data=loader with it")
    task = as_task(data, loss_fn) if data is not None else None
    if rec.needs_data and task is None:
        names = [s.spec.name for s in rec.stages if s.spec.needs_data and not s.optional]
        raise ConfigError(f"stages {names} need training data: pass --data (data= in Python)")
    dense = dense_safetensors_bytes(model.state_dict())
    work = model if inplace else copy.deepcopy(model)
    if ctx.device != "cpu":  # calibration batches go to ctx.device: so must the model
        work = work.to(ctx.device)
    swapped = linearize_conv1d(work)  # GPT-2's Conv1D as Linear: every stage then finds it
    if swapped:
        log.info("%d Hugging Face Conv1D layers run as Linear (weights transposed)", len(swapped))
    unfused = unfuse_experts(work)  # fused 3-D experts as one Linear each: every stage reaches them
    if unfused:
        log.info("%d mixture-of-experts layers run as one Linear per expert", len(unfused))
    run = Run(ctx, task, original=model if not inplace else copy.deepcopy(model).eval())
    report = []
    for i, stage in enumerate(rec.stages):
        name = stage.spec.name
        if stage.spec.needs_data and task is None:
            warnings.warn(f"stage {i + 1} ({name}) skipped: no training data given", stacklevel=2)
            report.append({"stage": i + 1, "method": name, "skipped": "no data"})
            continue
        log.info("stage %d: %s", i + 1, name)
        stage.spec.apply(work, stage.config, run)
        report.append({"stage": i + 1, "method": name})
    recipe_dict = {k: v for k, v in rec.to_dict().items() if k != "description"}
    update_info(work, recipe=recipe_dict, recipe_name=rec.name, dense_bytes=dense)
    if run.data_free:
        update_info(work, data_free_layers=sorted(set(run.data_free)))
    return CompressResult(work, rec, report, dense)


def get_metadata(model: nn.Module) -> MetadataView:
    """The model's metadata as the pre-redesign dict: a view onto its typed
    :class:`~slimtorch.core.info.ModelInfo`. Kept for one release; use
    ``slimtorch.core.info.model_info(model)`` and ``update_info(model, **fields)`` instead."""
    return MetadataView(model)


def set_architecture(model: nn.Module, architecture: dict[str, Any]) -> None:
    """Record how to rebuild ``model`` (see :func:`slimtorch.models.registry.rebuild`); the same
    as ``update_info(model, architecture=architecture)``."""
    update_info(model, architecture=architecture)


def save(
    model: nn.Module,
    path: str | Path,
    force: bool = False,
    metadata: dict[str, Any] | None = None,
    entropy: str | None = None,
) -> dict[str, Any]:
    """Write ``model`` as a compressed artifact at ``path``; returns the manifest.

    Refuses an existing ``path`` unless ``force``; never leaves a half-written directory.
    ``metadata`` sets :class:`~slimtorch.core.info.ModelInfo` fields for this artifact only.
    ``entropy`` ("none" or "huffman") defaults to the ``format`` of the recipe that compressed
    the model. docs/artifact.md describes the directory and its manifest.
    """
    return save_artifact(model, path, force, metadata, entropy)


def load(
    path: str | Path,
    width: float | None = None,
    kernels: bool = False,
    model: ModelOrFactory | None = None,
    trust_factory: bool = False,
) -> nn.Module:
    """Rebuild the model saved at ``path``: no pickle, outputs identical to the saved model.

    ``width`` in (0, 1] serves a model compressed with ``prune.reorder`` on the first
    ``width`` of its channels in every group (its most important ones): smaller and faster.
    ``kernels=True`` runs weight-only quantized Linear layers on torch's CPU kernels: 2-4-bit
    group weights (w4a16 presets) on the int4 kernel, 5-8-bit per-channel ones (their 8-bit LM
    head, the int8 preset) on the int8 kernel: less memory and faster decoding (bf16
    activations: logits within about 1e-2 relative of the dequantized model).

    Loading runs no code the artifact names. A model saved from ``package.module:factory`` (or
    a class slimtorch does not know) loads only when you pass ``model`` (an ``nn.Module``, whose
    weights are replaced in place, or a zero-argument factory) or ``trust_factory=True`` (import
    and call the factory the manifest names: only for artifacts you trust).
    """
    return load_artifact(path, width, kernels, model=model, trust_factory=trust_factory)


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
    info = model_info(model)
    evaluator = evaluator or info.evaluator
    data = data or info.data
    params, nonzero = count_params(model)
    out: dict[str, Any] = {"params": params, "nonzero_params": nonzero}
    inputs = example_inputs_for(model, architecture_of(model), latency_batch)
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
