"""Compress a Hugging Face checkpoint within a memory budget (``slimtorch compress --max-memory``).

When the checkpoint does not fit in ``--max-memory``, the recipe runs through
:func:`slimtorch.calibrate.offload.compress_offloaded`: one block in memory at a time, written
out as it finishes, resumable from ``--work-dir``. Every stage must be layer-wise (GPTQ, AWQ,
SmoothQuant, SparseGPT, Wanda, RTN, QuaRot's rotation); RTN also quantizes the layers outside
the blocks (the w4a16 presets' 8-bit embeddings and LM head, stored once when tied), and
``quantize.rotate`` (first in the recipe) rotates each block as it is read and the embedding,
final norm and LM head where the run handles them (test_workflow_offloaded_rotate.py). The
stages that swap runtime modules in (``quantize.activations``, ``quantize.fp8 activations:
dynamic``) swap each block's layers as it streams by, and the manifest records every runtime
module from :func:`runtime_records`, computed up front on the ``meta`` model
(test_workflow_offloaded_swaps.py). The result holds the tensors the in-memory run writes (tests/workflows/test_workflow_offloaded.py,
and on builtin:smollm2-135m with a kill and a resume, tests/workflows/test_offloaded_smollm2.py).
Under torchrun every rank runs it on its shard of the calibration data (``--max-memory`` is
each process's budget) and the artifact is the one-process one (docs/distributed.md).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import re
import resource
from pathlib import Path
from typing import Any

from torch import nn

from slimtorch.artifact.save import runtime_modules
from slimtorch.calibrate import distributed
from slimtorch.calibrate.checkpoint import Checkpoint
from slimtorch.calibrate.offload import (
    OffloadPlan,
    compress_offloaded,
    empty_parameters,
    fingerprint,
)
from slimtorch.calibrate.sequential import DataFree, find_blocks
from slimtorch.calibrate.swaps import skip_bare_parts
from slimtorch.calibrate.tasks import make_task
from slimtorch.calibrate.text import missing_tokenizer, model_tokenizer
from slimtorch.core.context import Context
from slimtorch.core.errors import ConfigError, UserInputError
from slimtorch.core.methods import Run
from slimtorch.graph.weights import select_weights
from slimtorch.models.hf import from_config, read_architecture
from slimtorch.quantize.stages.activations import ActivationsConfig, wrap_activations
from slimtorch.quantize.stages.floats import Fp8Config, fp8_dynamic
from slimtorch.quantize.stages.rotate import RotateConfig, insert_online_meta, offloaded_modules
from slimtorch.recipe import Recipe
from slimtorch.runtime.conv1d import linearize_conv1d
from slimtorch.runtime.moe import unfuse_experts

log = logging.getLogger(__name__)

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_UNITS.update({"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40})


def parse_bytes(text: str) -> int:
    """``"1GB"``, ``"512MiB"``, ``"1.5G"`` -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?I?B?)\s*", text.upper())
    unit = m.group(2) if m else ""
    unit = unit + "B" if unit and not unit.endswith("B") else unit
    if m is None or unit not in _UNITS:
        raise UserInputError(f"cannot read the memory size {text!r}; write e.g. 1GB or 512MiB")
    return int(float(m.group(1)) * _UNITS[unit])


def _param_bytes(module: nn.Module) -> int:
    return sum(p.numel() * 4 for p in module.parameters())


def _resident_now() -> int:
    """This process's resident memory now (imports, the meta skeleton): measured, not assumed."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):  # not Linux: the peak so far
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def estimate_peak(
    model: nn.Module,
    samples: int,
    length: int,
    hessians: bool,
    outside_stages: bool = False,
    rotation: bool = False,
) -> dict[str, int]:
    """Rough peak of an offloaded run: the memory in use now plus the largest of the capture
    phase, one block's work and, with ``outside_stages`` (data-free stages such as the w4a16
    presets' 8-bit embeddings), compressing the layers outside the blocks. A lower bound: the
    temporaries of quantizing and encoding come on top (measured on SmolLM2's 113 MB tied
    embedding: +221 MiB in quantize_weight), and so does tokenizing the calibration text
    (freed memory is handed back to the OS after each block; measured on a 4.1 GB checkpoint
    with RTN 4-bit: 1.37 GB peak; SmolLM2 w4a16-gptq with --max-memory 1GB: 0.78 GiB peak)."""
    blocks = find_blocks(model)
    block = model.get_submodule(blocks.names[0])
    hidden = int(getattr(model.config, "hidden_size", 0) or 0)  # type: ignore[union-attr]
    acts = 2 * samples * length * hidden * 4
    stats = sum(
        (m.in_features**2 * 8 if hessians else m.in_features * 8)  # float64 sums
        for m in block.modules()
        if isinstance(m, nn.Linear)
    )
    outside = _param_bytes(model) - len(blocks.names) * _param_bytes(block)
    inside = {id(p) for p in model.get_submodule(blocks.container).parameters()}
    largest = max((p.numel() * 4 for p in model.parameters() if id(p) not in inside), default=0)
    at_end = outside + largest if outside_stages else 0  # + one quantized copy
    # quantize.rotate: Q and the per-head rotations (float64) and each weight's float64
    # product (a slice of rows at a time for the big ones; a block's writers whole)
    block_max = max((p.numel() * 4 for p in block.parameters()), default=0)
    turn = 2 * 8 * hidden**2 + 4 * block_max if rotation else 0
    return {
        "block": _param_bytes(block),
        "statistics": stats,
        "activations": acts,
        "outside_blocks": outside,
        "outside_stages": at_end,
        "rotation": turn,
        "process": _resident_now(),
        "peak": max(outside + acts + turn, _param_bytes(block) + stats + acts + turn, at_end)
        + _resident_now(),
    }


def checkpoint_fp32_bytes(path: Path) -> int:
    total = 0
    for file in path.glob("*.safetensors"):
        with open(file, "rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        total += sum(4 * math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__")
    return total


def check_vocab(config: Any, batches: list[Any]) -> None:
    """Refuse calibration token ids that the model's embedding has no row for."""
    have = int(getattr(config, "vocab_size", 0) or 0)
    need = 1 + max((int(b[0].max()) for b in batches), default=-1)
    if have < need:
        raise ConfigError(
            f"the model's vocabulary ({have} tokens) is smaller than the calibration text's"
            f" token ids (up to {need - 1}): the tokenizer is not the model's; give the model's"
            " own with --tokenizer"
        )


def check_targets(model: nn.Module, recipe: Recipe) -> None:
    """``missing: error`` against the whole model (still on ``meta``), as the in-memory run
    checks it: block by block a stage only sees one part (a block, or the layers outside)."""
    for stage in recipe.stages:
        config = stage.config
        if getattr(config, "missing", "skip") == "error":
            select_weights(model, config.targets, config.ignore)  # TargetError: exit 2


def check_rotation_first(recipe: Recipe) -> None:
    """``quantize.rotate`` block by block rotates each block as it is read and the embedding
    before the first block's inputs are captured: every stage after it sees the rotated model,
    as in memory. A stage before it would have seen the unrotated one: refused."""
    names = [s.spec.name for s in recipe.stages]
    rotations = [i for i, n in enumerate(names) if n == "quantize.rotate"]
    if rotations and rotations[-1] >= len(rotations):
        raise ConfigError(
            f"with --max-memory, quantize.rotate must come before every other stage (the"
            f" recipe has {names}): put it first"
        )


def _swap(sim: nn.Module, config: Any) -> bool:
    """Apply the modules one stage swaps in to ``sim`` (on ``meta``); False: it swaps none."""
    if isinstance(config, ActivationsConfig):
        wrap_activations(sim, config)
    elif isinstance(config, Fp8Config) and config.activations == "dynamic":
        fp8_dynamic(sim, config)
    elif isinstance(config, RotateConfig):
        insert_online_meta(sim, config)  # its online Hadamards, as it records them
    else:
        return False
    return True


def runtime_records(model: nn.Module, recipe: Recipe) -> list[dict[str, Any]]:
    """The manifest's ``modules`` of the offloaded artifact, as the in-memory run saves them
    (names, configs, order): the stages that swap runtime modules in (quantize.rotate's online
    Hadamards from its records, quantize.activations, quantize.fp8 activations: dynamic through
    the functions they run) applied in recipe order to a copy of ``model``, still on ``meta``
    (no memory), with its GPT-2 Conv1D and MoE experts already swapped. A swap before a
    calibrated stage may not touch the layers outside the blocks: those are compressed again
    from the checkpoint at the end (refused with the fix)."""
    sim = copy.deepcopy(model)
    container = find_blocks(model).container + "."
    later = [s.spec.needs_data for s in recipe.stages]
    for k, stage in enumerate(recipe.stages):
        before = {r["name"] for r in runtime_modules(sim)}
        if not _swap(sim, stage.config) or not any(later[k + 1 :]):
            continue
        outside = sorted({r["name"] for r in runtime_modules(sim)} - before)
        outside = [n for n in outside if not n.startswith(container)]
        if outside:
            raise ConfigError(
                f"with --max-memory, {stage.spec.name} before a calibrated stage cannot swap"
                f" layers outside the blocks ({', '.join(outside)}); put it after the calibrated"
                " stages, or ignore those layers"
            )
    return runtime_modules(sim)


def compress_large(
    model_dir: str | Path,
    recipe: Recipe,
    out: str | Path,
    data: str | None,
    max_memory: int,
    work_dir: str | Path | None,
    ctx: Context,
    force: bool = False,
    tokenizer: str | None = None,
    source: str | None = None,
) -> dict[str, Any]:
    """Compress the checkpoint in ``model_dir`` block by block; returns the artifact manifest
    (under torchrun: on rank 0; ``{}`` on the others, each of which calibrated its shard).
    Its text is tokenized with ``tokenizer`` (``--tokenizer``), else the ``tokenizer.json``
    beside its ``config.json``; a UserInputError names --tokenizer when it has neither.
    ``source`` is the ``--model`` the user gave (a builtin's name), recorded in the metadata."""
    root = Path(model_dir)
    not_layerwise = [s.spec.name for s in recipe.stages if s.spec.layerwise is None]
    if not_layerwise:
        raise ConfigError(
            f"stages {not_layerwise} need the whole model in memory; with --max-memory only"
            " layer-wise stages run (`slimtorch methods` marks them: quantize.rotate/rtn/hqq/"
            "gptq/awq/smoothquant/mxfp4/nvfp4/fp8/activations, prune.sparsegpt/wanda)"
        )
    check_rotation_first(recipe)
    arch = read_architecture(root)
    with empty_parameters():
        model = from_config(arch)
        # fused 3-D experts as one Linear each, on meta like the rest: the checkpoint's
        # per-expert, Mixtral-original or fused tensors are read per expert (Checkpoint)
        unfuse_experts(model)
    linearize_conv1d(model)  # GPT-2's Conv1D run as Linear, recorded in the manifest
    check_targets(model, recipe)
    offloaded_modules(model, [s.config for s in recipe.stages])  # rotate: checks the blocks
    records = runtime_records(model, recipe)  # swapped or inserted runtime modules
    config: Any = getattr(model, "config", None)
    if getattr(config, "use_cache", None):
        config.use_cache = False  # a KV cache is not needed to calibrate
    # the first stage that calibrates sets the calibration data of all
    cal = next((c for s in recipe.stages if (c := getattr(s.config, "calibration", None))), None)
    samples, batch = (cal.samples, cal.batch_size) if cal is not None else (8, 8)
    steps = max(1, -(-samples // batch))
    comm = distributed.active()
    world = comm.world if comm is not None else 1
    held = min(samples, -(-steps // world) * batch)  # one rank's shard of the activations
    hessians = any(s.spec.name in ("quantize.gptq", "prune.sparsegpt") for s in recipe.stages)
    data_free = any(not s.spec.needs_data for s in recipe.stages)  # RTN: also outside the blocks
    rotation = any(s.spec.name == "quantize.rotate" for s in recipe.stages)
    est = estimate_peak(model, held, 256, hessians, outside_stages=data_free, rotation=rotation)
    if est["peak"] > max_memory:
        sizes = ", ".join(f"{k} {v / 2**20:.0f} MiB" for k, v in est.items())
        raise ConfigError(
            f"--max-memory {max_memory / 2**20:.0f} MiB is below the estimated peak of one"
            f" block ({sizes}; each process's own); raise it or lower `calibration.samples`"
        )
    beside = root / "tokenizer.json"
    tokenizer = model_tokenizer(
        str(root), str(beside.resolve()) if beside.is_file() else None, tokenizer
    )
    if tokenizer is None:
        raise missing_tokenizer(str(root))
    task = make_task("causal-lm", data, tokenizer)
    run = Run(ctx, task, original=None)
    compressors = [s.spec.layerwise(s.config, run) for s in recipe.stages]  # type: ignore[misc]
    for compressor in compressors:  # a block of runtime modules only has nothing to compress
        if isinstance(compressor, DataFree):
            skip_bare_parts(compressor)
    batches = list(task.train_batches(ctx, steps, batch))
    check_vocab(config, batches)
    recipe_dict = {k: v for k, v in recipe.to_dict().items() if k != "description"}
    if rotation:  # the LM head is untied (as in memory): the artifact rebuilds it untied
        arch = {**arch, "config": {**arch["config"], "tie_word_embeddings": False}}
    manifest = {
        "architecture": arch,
        "modules": records,  # Conv1DLinear, UnfusedExperts, online Hadamards, ...
        "metadata": {
            "source": source or str(root),
            "recipe": recipe_dict,
            "recipe_name": recipe.name,
            "dense_bytes": checkpoint_fp32_bytes(root),
            "evaluator": "perplexity",
            "tokenizer": tokenizer,
            "offloaded": True,
        },
    }
    out = Path(out)
    work = Path(work_dir) if work_dir else out.parent / f".{out.name}.work"
    key = fingerprint(arch, recipe_dict, data, samples, batch, ctx.seed, tokenizer, world)
    plan = OffloadPlan(out, manifest, work, key, overwrite=force)
    log.info("offloaded compression of %s: estimated peak %.0f MiB", root, est["peak"] / 2**20)
    return compress_offloaded(
        model, Checkpoint(root), batches, compressors, plan, ctx, task.forward
    )
