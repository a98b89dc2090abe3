"""Sequential compression of a checkpoint bigger than memory: one block at a time, resumable.

The model is built with its parameters on the ``meta`` device (no memory), so only its small
buffers exist. The layers outside the blocks (embeddings, LM head) are read from the
safetensors shards, the calibration batches run up to block 0, and those layers are freed.
Then each block is read from the shards, compressed by the recipe's layer-wise stages (each
observes the block's inputs, then compresses), written as its own small artifact, run to
produce the next block's inputs, and freed. Peak memory is about one block, its statistics and
the calibration activations. After every block, the next inputs and the progress are saved
atomically in ``work_dir`` (:mod:`slimtorch.calibrate.offload_work`): an interrupted run
started again with the same arguments continues after the last finished block and produces the
identical artifact. Under torchrun (:mod:`slimtorch.calibrate.distributed`) every rank runs its
shard of the calibration batches through the block and keeps its own saved inputs, the
statistics are combined across ranks and each layer is compressed once and broadcast, as in
memory; rank 0 alone writes the blocks, the progress and the artifact. Then the layers outside the
blocks are written: streamed as they are, or, when the recipe has data-free stages (RTN of the
embeddings and LM head), read again and compressed by those stages as in memory. Finally the
parts are joined into one artifact (:func:`slimtorch.formats.concat.concat_artifacts`).

On ``--device`` (``ctx.device``) tensors are read on the CPU and moved there: the capture,
each block's calibration, compression and next inputs (kept there) run there; what is written
goes through the CPU (:mod:`slimtorch.calibrate.offload_work`, "Devices").
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import shutil
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from slimtorch.calibrate import distributed
from slimtorch.calibrate.capture import Forward, _call, capture_block_inputs
from slimtorch.calibrate.checkpoint import Checkpoint
from slimtorch.calibrate.offload_work import (
    HOST,
    OffloadPlan,
    WorkDir,
    fingerprint,
    place_buffers,
    to_host,
)
from slimtorch.calibrate.sequential import (
    BlockCompressor,
    DataFree,
    compress_block,
    find_blocks,
    next_inputs,
)
from slimtorch.calibrate.statistics import share_data_free
from slimtorch.core.context import Context
from slimtorch.core.errors import UserInputError
from slimtorch.formats.artifact import read_manifest, write_artifact
from slimtorch.formats.concat import concat_artifacts
from slimtorch.formats.state import clear_state, iter_states
from slimtorch.formats.streaming import StreamingArtifactWriter, TensorSpec

DATA_FREE = "data_free_layers"  # the artifact's note (ModelInfo) of layers compressed without data

__all__ = ["Checkpoint", "OffloadPlan", "compress_offloaded", "empty_parameters", "fingerprint"]

log = logging.getLogger(__name__)


@contextlib.contextmanager
def empty_parameters() -> Iterator[None]:
    """Modules built inside get their parameters on ``meta`` (no memory); buffers stay real."""
    original = nn.Module.register_parameter

    def register(self: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(self, name, param)
        if param is not None and param.device.type != "meta":
            meta = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
            self._parameters[name] = meta

    nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def return_freed_memory(mmap_threshold: int | None = None) -> bool:
    """Hand freed heap memory back to the OS (glibc ``malloc_trim``); with ``mmap_threshold``,
    also map every allocation of at least that many bytes on its own from now on, so freeing it
    returns it at once (glibc otherwise keeps one block's big temporaries and the next block adds
    its own). Process-wide; False, doing nothing, where the C library is not glibc."""
    try:
        lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return False
    if not sys.platform.startswith("linux") or not hasattr(lib, "malloc_trim"):
        return False
    if mmap_threshold is not None:
        lib.mallopt(-3, int(mmap_threshold))  # M_MMAP_THRESHOLD, fixed from now on
    lib.malloc_trim(0)
    return True


def materialize(
    module: nn.Module,
    prefix: str,
    ckpt: Checkpoint,
    ties: dict[str, str],
    device: torch.device = HOST,
) -> None:
    """Give ``module``'s meta parameters their values from the checkpoint, on ``device`` (read
    on the CPU, then moved)."""
    for pname, param in list(module.named_parameters(recurse=True)):
        full = f"{prefix}.{pname}" if prefix else pname
        key = full if full in ckpt.where else ties.get(full, full)
        if key not in ckpt.where:
            raise UserInputError(f"{ckpt.root}: tensor {full!r} is not in the checkpoint")
        owner, _, leaf = pname.rpartition(".")
        target = module.get_submodule(owner) if owner else module
        value = ckpt.get(key).to(device, torch.float32)
        if type(target).__name__ == "Conv1DLinear" and leaf == "weight":
            value = value.t().contiguous()  # stored [in, out] by transformers' Conv1D
        if value.shape != param.shape:
            raise UserInputError(
                f"{ckpt.root}: tensor {full!r} reads {tuple(value.shape)} from the checkpoint"
                f" but the model's config gives {tuple(param.shape)}"
            )
        target._parameters[leaf] = nn.Parameter(value, requires_grad=param.requires_grad)


def release(module: nn.Module, buffers: bool = False) -> None:
    """Free ``module``'s parameters (back to ``meta``) and the compression states it holds
    (written out already: they are as big as the quantized weights); with ``buffers``, its
    buffers too (a finished block: the codes of the runtime modules swapped in, Fp8Linear's)."""
    if buffers:
        for sub in module.modules():
            for leaf, buf in list(sub._buffers.items()):
                if buf is not None and buf.device.type != "meta":
                    sub._buffers[leaf] = buf.to("meta")
    for _mname, owner, pname, _state in iter_states(module):
        clear_state(owner, pname)
    for sub in module.modules():
        for leaf, param in list(sub._parameters.items()):
            if param is not None and param.device.type != "meta":
                sub._parameters[leaf] = nn.Parameter(
                    param.detach().to("meta"), requires_grad=param.requires_grad
                )


def _block_artifact(block: nn.Module, prefix: str, path: Path, data_free: list[str]) -> None:
    """One block's part of the artifact, with the block's layers compressed without data."""
    tensors = {f"{prefix}.{k}": v.detach() for k, v in block.state_dict().items()}
    states = {
        (f"{prefix}.{m}.{p}" if m else f"{prefix}.{p}"): s for m, _, p, s in iter_states(block)
    }
    notes = {DATA_FREE: data_free} if data_free else {}
    write_artifact(path, *to_host(tensors, states), notes, overwrite=True)


def _module_artifact(parts: tuple[dict[str, torch.Tensor], dict[str, Any]], path: Path) -> None:
    write_artifact(path, *to_host(*parts), {}, overwrite=True)


def _outside_stages(
    model: nn.Module, container: str, stages: Sequence[BlockCompressor]
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Apply the data-free stages (``DataFree``: RTN) to the layers outside the blocks, as the
    in-memory run does: on the model with its block list emptied, so that targets match the
    same full names (``lm_head``, ``model.embed_tokens``) and a tied embedding and LM head are
    quantized once. Returns those layers' tensors and compression states."""
    parent_name, _, leaf = container.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    held = parent._modules[leaf]
    parent._modules[leaf] = nn.ModuleList()
    try:
        for stage in stages:
            assert isinstance(stage, DataFree)
            stage.fn(model)
        tensors = {k: v.detach() for k, v in model.state_dict().items()}
        states = {(f"{m}.{p}" if m else p): s for m, _, p, s in iter_states(model)}
    finally:
        parent._modules[leaf] = held
    return tensors, states


def compress_offloaded(
    model: nn.Module,
    ckpt: Checkpoint,
    batches: Iterable[Any],
    compressors: Sequence[BlockCompressor],
    plan: OffloadPlan,
    ctx: Context,
    forward: Forward = _call,
) -> dict[str, Any]:
    """Compress ``model`` (built under :func:`empty_parameters`) block by block from ``ckpt``;
    writes the artifact ``plan.out`` and returns its manifest. Under torchrun every rank calls
    it with the same arguments; rank 0 writes and returns the manifest, the others ``{}``.
    Tensors are computed on ``ctx.device`` and written from the CPU (module docstring)."""
    comm = distributed.active()
    device = ctx.torch_device
    blocks = find_blocks(model)
    if blocks.names == [""]:
        raise UserInputError("offloaded compression needs a model with repeated blocks")
    return_freed_memory(mmap_threshold=1 << 20)
    ties = _ties(model)
    if comm is not None:
        batches = distributed.shard(list(batches), comm)
    work = WorkDir(plan, comm)
    done = work.start()
    place_buffers(model, device)
    _materialize_outside(model, blocks, ckpt, ties, device)
    data_free = [isinstance(c, DataFree) for c in compressors]
    if not all(data_free):  # data-free stages before the first calibrated one change its inputs
        _outside_stages(model, blocks.container, compressors[: data_free.index(False)])
    modules = [model.get_submodule(n) for n in blocks.names]
    calls = capture_block_inputs(model, modules, batches, forward)  # blocks still on meta
    inputs = calls[0]
    buffers = _outside_buffers(model, blocks.container)
    release(model)
    return_freed_memory()
    if done >= 0 and done + 1 < len(modules):
        inputs = work.load_inputs(done + 1, calls[done + 1])
    # the in-memory run calibrates every stage on the blocks as the stages before it left
    # them: the data-free stages after the last calibrated one must not change the inputs the
    # next block is calibrated on, so they run after those inputs are computed
    calibrated = [k for k, c in enumerate(compressors) if not isinstance(c, DataFree)]
    feeding = calibrated[-1] + 1 if calibrated else len(compressors)
    bar = ctx.progress_bar(list(enumerate(blocks.names)), "blocks", len(blocks.names))
    for i, name in bar:
        if i <= done:
            continue
        if comm is not None:
            distributed.check_fault(comm, i)
        block = modules[i]
        materialize(block, name, ckpt, ties, device)
        for compressor in compressors[:feeding]:  # with comm: reduced statistics, owners broadcast
            compress_block(block, name, inputs, compressor, comm)
        if i + 1 < len(blocks.names):
            inputs = next_inputs(block, inputs, calls[i + 1])
            work.save_inputs(i + 1, inputs)
        for compressor in compressors[feeding:]:  # data-free stages after the last calibrated
            compress_block(block, name, inputs, compressor, comm)
        noted = share_data_free(compressors, comm)  # a collective: each rank noted its own
        if work.lead:  # the block's notes go with it: a resumed run still lists them
            mine = [n for n in noted if n.startswith(f"{name}.")]
            _block_artifact(block, name, plan.work_dir / f"block{i:05d}", mine)
        calls[i] = []
        work.block_done(i)  # a barrier, then rank 0 marks the block done
        release(block, buffers=True)
        return_freed_memory()
    if not work.lead:
        work.leave()
        return {}
    head = plan.work_dir / "outside"
    if not head.exists():
        outside = [c for c in compressors if isinstance(c, DataFree)]
        if outside:  # RTN of the embeddings / LM head: the layers outside the blocks at once
            _materialize_outside(model, blocks, ckpt, ties, device)
            _module_artifact(_outside_stages(model, blocks.container, outside), head)
            release(model)
        else:  # dense: streamed from the checkpoint one tensor at a time
            _outside_artifact(model, blocks.container, ckpt, ties, buffers, head)
    parts = [head] + [plan.work_dir / f"block{i:05d}" for i in range(len(blocks.names))]
    noted = sorted(n for p in parts[1:] for n in read_manifest(p).get(DATA_FREE, []))
    meta = {**plan.manifest.get("metadata", {}), DATA_FREE: noted}
    keys = {**plan.manifest, "metadata": meta} if noted else plan.manifest  # as in memory
    manifest = concat_artifacts(parts, plan.out, keys, overwrite=plan.overwrite)
    shutil.rmtree(plan.work_dir, ignore_errors=True)
    return manifest


def _ties(model: nn.Module) -> dict[str, str]:
    """Parameter names that alias another (a tied LM head) -> the name stored in checkpoints."""
    first: dict[int, str] = {}
    ties = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first:
            ties[name] = first[id(param)]
        else:
            first[id(param)] = name
    return ties


def _outside_params(model: nn.Module, container: str) -> list[str]:
    return [
        n for n, _ in model.named_parameters(remove_duplicate=False)
        if not n.startswith(container + ".")
    ]  # fmt: skip


def _materialize_outside(
    model: nn.Module, blocks: Any, ckpt: Checkpoint, ties: dict[str, str], device: torch.device
) -> None:
    for name in _outside_params(model, blocks.container):
        if name in ties:
            continue  # a tied LM head: the tensor it shares, read once (below)
        owner, _, leaf = name.rpartition(".")
        module = model.get_submodule(owner) if owner else model
        param = module._parameters[leaf]
        if param is None or param.device.type != "meta":
            continue
        stored = [k for k in (name, *(a for a, t in ties.items() if t == name)) if k in ckpt.where]
        if not stored:
            raise UserInputError(f"{ckpt.root}: tensor {name!r} is not in the checkpoint")
        module._parameters[leaf] = nn.Parameter(ckpt.get(stored[0]).to(device, torch.float32))
    for alias, target in ties.items():
        if not alias.startswith(blocks.container + "."):
            owner, _, leaf = alias.rpartition(".")
            t_owner, _, t_leaf = target.rpartition(".")
            src = model.get_submodule(t_owner) if t_owner else model
            dst = model.get_submodule(owner) if owner else model
            dst._parameters[leaf] = src._parameters[t_leaf]


def _outside_buffers(model: nn.Module, container: str) -> dict[str, torch.Tensor]:
    """Persistent buffers outside the blocks (written as they are): CPU copies."""
    params = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    return {
        k: v.detach().to(HOST, copy=True)
        for k, v in model.state_dict().items()
        if k not in params and not k.startswith(container + ".") and v.device.type != "meta"
    }


def _outside_artifact(
    model: nn.Module,
    container: str,
    ckpt: Checkpoint,
    ties: dict[str, str],
    buffers: dict[str, torch.Tensor],
    path: Path,
) -> None:
    """The tensors outside the blocks, streamed one at a time from the checkpoint (an
    embedding and an LM head are each as big as several blocks)."""
    names = [
        n for n, _ in model.named_parameters(remove_duplicate=False)
        if not n.startswith(container + ".") and n not in ties
    ]  # fmt: skip
    names += list(buffers)
    specs = []
    for name in names:
        if name in buffers:
            specs.append(TensorSpec(name, tuple(buffers[name].shape), buffers[name].dtype))
            continue
        with safe_open(str(ckpt.where[name]), "pt") as f:
            shape = tuple(f.get_slice(name).get_shape())
        specs.append(TensorSpec(name, shape, torch.float32))
    aliases = {a: t for a, t in ties.items() if not a.startswith(container + ".")}
    with StreamingArtifactWriter(path, specs, {}, overwrite=True, aliases=aliases) as writer:
        for name in names:  # one at a time: the last is freed before the next is read
            writer.write(name, buffers[name] if name in buffers else ckpt.get(name).float())
