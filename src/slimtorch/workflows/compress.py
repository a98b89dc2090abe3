"""Compress a model spec to an artifact directory and measure it against the original.

In memory by default; with ``max_memory`` a Hugging Face checkpoint bigger than half of it is
compressed block by block (:mod:`slimtorch.workflows.offloaded`). Under torchrun
(:mod:`slimtorch.workflows.compress_distributed`) every rank calibrates its shard of the data
and rank 0 alone evaluates and writes the artifact.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from slimtorch import api
from slimtorch.calibrate import distributed
from slimtorch.calibrate.lm import check_vocab
from slimtorch.calibrate.tasks import make_task, takes_tokenizer
from slimtorch.calibrate.text import missing_tokenizer, model_tokenizer
from slimtorch.core.context import Context
from slimtorch.core.errors import ConfigError
from slimtorch.core.info import update_info
from slimtorch.core.methods import Task
from slimtorch.models.registry import LoadedModel, checkpoint_dir, load_model
from slimtorch.recipe import Recipe, load_recipe
from slimtorch.workflows.figures import (
    LLM_WINDOW_TOKENS,
    LLM_WINDOWS,
    baseline,
    llm_figures,
    summary,
    vocab_size,
)
from slimtorch.workflows.generate import on_device
from slimtorch.workflows.oneshot import warn_unrecovered

log = logging.getLogger(__name__)


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
    tokenizer: str | None = None  # --tokenizer: a causal LM's tokenizer.json or builtin:NAME
    llm_windows: int = LLM_WINDOWS  # the LLM quality suite: windows per text (0: skip it)
    llm_window_tokens: int = LLM_WINDOW_TOKENS  # ... and tokens per window


def _task_for(
    loaded: LoadedModel, data: str | None, needed: bool, tokenizer: str | None
) -> Task | None:
    if data is None:
        return None
    if loaded.task is None:
        if needed:
            raise ConfigError(
                f"no training task is known for {loaded.source}: fine-tuning stages need a"
                " builtin model with a task, or drop those stages from the recipe"
            )
        return None
    if tokenizer is None and takes_tokenizer(loaded.task):
        raise missing_tokenizer(loaded.source)
    task = make_task(loaded.task, data, tokenizer)
    ids = getattr(task, "ids", None)
    if tokenizer is not None and isinstance(ids, torch.Tensor):
        check_vocab(ids, vocab_size(loaded.model), tokenizer)
    return task


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
    comm = distributed.active()
    if comm is not None:
        check_distributable(rec, options)
    if options.max_memory is not None:
        report = _maybe_offloaded(model, rec, out, options, ctx)
        if report is not None:
            return report
    loaded = load_model(model)
    warn_unrecovered(rec, data, loaded.evaluator)
    tokenizer = model_tokenizer(model, loaded.tokenizer, options.tokenizer)
    has_data_stage = any(s.spec.needs_data for s in rec.stages)
    needed = rec.needs_data or (has_data_stage and data is not None)
    task = _task_for(loaded, data, needed, tokenizer)
    eval_data = (data if loaded.evaluates_training_data else None) or loaded.data
    update_info(
        loaded.model,
        architecture=loaded.architecture,
        source=model,
        evaluator=loaded.evaluator,
        data=eval_data,
        input=_input_spec(options),
        tokenizer=tokenizer,
    )
    lead = comm is None or comm.rank == 0  # rank 0 alone measures and writes
    on_device(loaded.model, ctx)  # --device: the original is measured (and compared) there
    before = api.evaluate(loaded.model, ctx=ctx, latency_batch=latency_batch) if lead else {}
    result = api.compress(loaded.model, rec, task, ctx)
    traffic = distributed.traffic(comm) if comm is not None else None
    if not lead:
        return {"model": model, "recipe": rec.name, "out": None, "distributed": traffic}
    api.save(result.model, out, force=force)
    reloaded = api.load(out, trust_factory=True)  # written just above from the user's --model
    reloaded = on_device(reloaded, ctx)
    measured = api.evaluate(reloaded, ctx=ctx, latency_batch=latency_batch)
    report = summary(out, measured, result.dense_bytes)
    report.update(
        {
            "model": model,
            "recipe": rec.name,
            "out": str(out),
            "stages": result.stages,
            **baseline(before),
        }
    )
    if traffic is not None:
        report["distributed"] = traffic
    if loaded.task == "causal-lm" and tokenizer is not None and options.llm_windows > 0:
        suite = (options.llm_windows, options.llm_window_tokens)
        report.update(llm_figures(reloaded, loaded.model, tokenizer, ctx, suite))
    return report


def check_distributable(rec: Recipe, options: CompressOptions) -> None:
    """What a torchrun job can run: layer-wise stages calibrate on their shard of the data,
    in memory or offloaded (``--max-memory``, resumable); a training stage would train one
    copy per rank."""
    trains = [s.spec.name for s in rec.stages if s.spec.needs_data and s.spec.layerwise is None]
    if trains:
        raise ConfigError(
            f"stages {trains} train on the data; a distributed run shares the calibration of"
            " layer-wise stages only (quantize.gptq/awq/smoothquant/rtn, prune.sparsegpt/wanda):"
            " run this recipe in one process"
        )


def _maybe_offloaded(
    model: str, rec: Recipe, out: Path, options: CompressOptions, ctx: Context
) -> dict[str, Any] | None:
    """The offloaded run when ``model`` is a checkpoint bigger than ``--max-memory``."""
    from slimtorch.workflows import offloaded

    budget = offloaded.parse_bytes(str(options.max_memory))
    path = checkpoint_dir(model)  # a builtin's or a .gguf file's cached directory too
    if path is None:
        raise ConfigError(
            "--max-memory compresses a Hugging Face checkpoint block by block; give --model a"
            " directory with config.json and *.safetensors, a Llama-family .gguf file, or a"
            " builtin with such a checkpoint (builtin:smollm2-135m)"
        )
    dense = offloaded.checkpoint_fp32_bytes(path)
    if dense <= budget // 2:
        log.info("%s (%.0f MiB) fits in --max-memory: compressing in memory", model, dense / 2**20)
        return None
    manifest = offloaded.compress_large(
        path,
        rec,
        out,
        options.data,
        budget,
        options.work_dir,
        ctx,
        options.force,
        tokenizer=options.tokenizer,
        source=model,
    )
    comm = distributed.active()
    traffic = distributed.traffic(comm) if comm is not None else None  # rank 0 has written
    if comm is not None and comm.rank != 0:
        return {"model": model, "recipe": rec.name, "out": None, "distributed": traffic}
    on_disk = api.artifact_size(out)
    report = {
        "model": model,
        "recipe": rec.name,
        "out": str(out),
        "offloaded": True,
        "bytes_on_disk": on_disk,
        "dense_bytes": dense,
        "compression_ratio": dense / on_disk if on_disk else None,
        "tensors": len(manifest["tensors"]),
    }
    if traffic is not None:
        report["distributed"] = traffic
    return report
