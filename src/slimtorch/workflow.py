"""End-to-end workflows the CLI exposes: compress a model spec to a directory, evaluate an
artifact against its original, describe an artifact, run the demo. Each returns a JSON-able
dict so the CLI only formats it.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slimtorch import api
from slimtorch.calibrate.tasks import make_task
from slimtorch.core.context import Context
from slimtorch.core.errors import ConfigError
from slimtorch.core.methods import Task
from slimtorch.formats.artifact import read_manifest
from slimtorch.formats.sizes import describe
from slimtorch.models.registry import LoadedModel, load_model
from slimtorch.recipe import list_presets, load_recipe

log = logging.getLogger(__name__)


def _task_for(loaded: LoadedModel, data: str | None, needed: bool) -> Task | None:
    if data is None:
        return None
    if loaded.task is None:
        if needed:
            raise ConfigError(
                f"no training task is known for {loaded.source}: fine-tuning stages need a"
                " builtin model with a task, or drop those stages from the recipe"
            )
        return None
    return make_task(loaded.task, data)


def _baseline(measured: dict[str, Any]) -> dict[str, Any]:
    """The original model's figures, as ``baseline_*`` keys of a report."""
    keys = ("value", "latency_ms", "params", "nonzero_params")
    return {f"baseline_{k}": measured.get(k) for k in keys}


def _summary(out: Path, measured: dict[str, Any], dense_bytes: int) -> dict[str, Any]:
    on_disk = api.artifact_size(out)
    return {
        "bytes_on_disk": on_disk,
        "dense_bytes": dense_bytes,
        "compression_ratio": dense_bytes / on_disk if on_disk else None,
        **measured,
    }


@dataclass
class CompressOptions:
    """Options of :func:`compress_to_dir` besides model, recipe and output."""

    data: str | None = None
    force: bool = False
    latency_batch: int = 1
    input_shape: str | None = None  # "1,3,32,32": latency input for models slimtorch doesn't know
    input_dtype: str = "float32"
    max_memory: str | None = None  # "1GB": compress a bigger HF checkpoint block by block
    work_dir: str | None = None  # where an offloaded run keeps its progress (resume)


def _input_spec(options: CompressOptions) -> dict[str, Any] | None:
    if not options.input_shape:
        return None
    try:
        shape = [int(d) for d in options.input_shape.split(",")]
    except ValueError:
        raise ConfigError(
            f"--input-shape {options.input_shape!r} must be comma-separated integers, e.g. 1,3,32,32"
        ) from None
    if not shape or min(shape) < 1:
        raise ConfigError(f"--input-shape {options.input_shape!r} needs positive sizes")
    return {"shape": shape, "dtype": options.input_dtype}


def compress_to_dir(
    model: str,
    recipe: str,
    out: str | Path,
    options: CompressOptions | None = None,
    ctx: Context | None = None,
) -> dict[str, Any]:
    """Load ``model``, measure it, compress with ``recipe``, save to ``out``, reload and measure."""
    options = options or CompressOptions()
    ctx = ctx or Context()
    data, force, latency_batch = options.data, options.force, options.latency_batch
    out = Path(out)
    if out.exists() and not force:
        raise ConfigError(f"output directory {out} exists; pass --force to replace it")
    rec = load_recipe(recipe)
    if options.max_memory is not None:
        report = _maybe_offloaded(model, rec, out, options, ctx)
        if report is not None:
            return report
    loaded = load_model(model)
    has_data_stage = any(s.spec.needs_data for s in rec.stages)
    task = _task_for(loaded, data, rec.needs_data or (has_data_stage and data is not None))
    eval_data = (data if loaded.evaluates_training_data else None) or loaded.data
    api.set_architecture(loaded.model, loaded.architecture)
    api.get_metadata(loaded.model).update(
        {
            "source": model,
            "evaluator": loaded.evaluator,
            "data": eval_data,
            "input": _input_spec(options),
        }
    )
    baseline = api.evaluate(loaded.model, ctx=ctx, latency_batch=latency_batch)
    result = api.compress(loaded.model, rec, task, ctx)
    api.save(result.model, out, force=force)
    reloaded = api.load(out)
    measured = api.evaluate(reloaded, ctx=ctx, latency_batch=latency_batch)
    report = _summary(out, measured, result.dense_bytes)
    report.update(
        {
            "model": model,
            "recipe": rec.name,
            "out": str(out),
            "stages": result.stages,
            **_baseline(baseline),
        }
    )
    return report


def _maybe_offloaded(
    model: str, rec: Any, out: Path, options: CompressOptions, ctx: Context
) -> dict[str, Any] | None:
    """The offloaded run when ``model`` is a checkpoint bigger than ``--max-memory``."""
    from slimtorch import large

    budget = large.parse_bytes(str(options.max_memory))
    path = Path(model)
    if not (path.is_dir() and (path / "config.json").is_file()):
        raise ConfigError(
            "--max-memory compresses a local Hugging Face checkpoint block by block; give"
            " --model a directory with config.json and *.safetensors"
        )
    dense = large.checkpoint_fp32_bytes(path)
    if dense <= budget // 2:
        log.info("%s (%.0f MiB) fits in --max-memory: compressing in memory", model, dense / 2**20)
        return None
    manifest = large.compress_large(
        path, rec, out, options.data, budget, options.work_dir, ctx, options.force
    )
    on_disk = api.artifact_size(out)
    return {
        "model": model,
        "recipe": rec.name,
        "out": str(out),
        "offloaded": True,
        "bytes_on_disk": on_disk,
        "dense_bytes": dense,
        "compression_ratio": dense / on_disk if on_disk else None,
        "tensors": len(manifest["tensors"]),
    }


def evaluate_dir(
    path: str | Path,
    data: str | None = None,
    ctx: Context | None = None,
    latency_batch: int = 1,
    baseline: bool = True,
    width: float | None = None,
) -> dict[str, Any]:
    """Measure an artifact and, when its source is known, the original model beside it.
    ``width`` serves a ``prune.reorder``-ed artifact on that fraction of its channels."""
    ctx = ctx or Context()
    path = api.require_dir(path)
    model = api.load(path, width=width)
    meta = api.get_metadata(model)
    measured = api.evaluate(model, data=data, ctx=ctx, latency_batch=latency_batch)
    report = _summary(path, measured, int(meta.get("dense_bytes", 0)))
    report["source"] = meta.get("source")
    if width is not None:
        report["width"] = width
    if baseline and meta.get("source"):
        original = load_model(str(meta["source"]))
        api.set_architecture(original.model, original.architecture)
        api.get_metadata(original.model).update(
            {k: meta.get(k) for k in ("evaluator", "data", "input")}
        )
        base = api.evaluate(original.model, data=data, ctx=ctx, latency_batch=latency_batch)
        report.update(_baseline(base))
    return report


def inspect_dir(path: str | Path) -> dict[str, Any]:
    path = api.require_dir(path)
    manifest = read_manifest(path)
    return {
        "dir": str(path),
        "bytes_on_disk": api.artifact_size(path),
        "dense_bytes": manifest.get("metadata", {}).get("dense_bytes"),
        "architecture": manifest.get("architecture", {}).get("kind"),
        "source": manifest.get("metadata", {}).get("source"),
        "recipe": manifest.get("metadata", {}).get("recipe_name"),
        "layers": describe(manifest),
    }


def presets() -> dict[str, Any]:
    return {"presets": list_presets()}


def demo(
    out: str | None = None, recipe: str = "sparse90-int8", ctx: Context | None = None
) -> dict[str, Any]:
    """Compress the bundled LeNet-5 (Fashion-MNIST) and report before/after.

    Without the Debian Fashion-MNIST package there is no training data: the demo then uses the
    `int8` preset and the test subset shipped with slimtorch.
    """
    from slimtorch.zoo.data_images import fashion_mnist_available

    data: str | None = "builtin:fashion-mnist"
    note = None
    if not fashion_mnist_available("train"):
        recipe, data = "int8", None
        note = (
            "Fashion-MNIST training data not installed (Debian package dataset-fashion-mnist);"
            " using the int8 preset and the shipped 2,000-image test subset"
        )
    with tempfile.TemporaryDirectory(prefix="slimtorch-demo-") as tmp:
        target = Path(out) if out else Path(tmp) / "lenet5-fashion"
        options = CompressOptions(data=data, force=out is not None)
        report = compress_to_dir("builtin:lenet5-fashion", recipe, target, options, ctx)
    report["note"] = note
    if not out:
        report["out"] = None
    return report
