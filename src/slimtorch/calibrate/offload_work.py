"""The work directory of an offloaded run (:mod:`slimtorch.calibrate.offload`): progress, the
saved block inputs, and resuming, on one process or on every rank of a torchrun job.

What it holds:

* ``block%05d/``: each finished block as its own small artifact, written by rank 0 alone
  (every rank holds the same weights once a block is compressed and broadcast);
* ``inputs%05d.rank%d.safetensors``: the hidden states entering a block, one file per rank
  (its own shard of the calibration batches), named by the block they feed, so a file is never
  overwritten by the next block's before the progress says that block is done;
* ``progress.json``: the last block every rank finished, the world size, and the run's
  fingerprint (model, recipe, calibration, world size), written by rank 0 alone.

The order per block: rank 0 writes the block; every rank saves the next block's inputs; a
barrier; rank 0 marks the block done. A kill anywhere leaves ``done`` at a block that every
rank had finished and saved, so a rerun with the same command resumes after it. Rank 0 reads
the progress and broadcasts it: the other ranks only need their own inputs files (the work dir
need not be shared between nodes, but must be the same path on each and survive the kill).

Devices: tensors are read from the shards on the CPU and moved to ``--device``
(``ctx.device``); the calibration batches run there up to block 0, each block calibrates,
compresses and produces the next block's inputs there, and those inputs stay there (the simple
choice: on the models this path is for they are much smaller than a block, and a trip to the
CPU would cost two copies a block). What is written goes through the CPU: blocks from CPU
copies (:func:`to_host`), inputs files as CPU tensors, read back onto the device of the call
they feed (:func:`input_device`), so a run resumes on another device or on the CPU.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from slimtorch.calibrate.capture import Inputs, hidden_of, with_hidden
from slimtorch.calibrate.distributed import Comm
from slimtorch.core.errors import ConfigError, UserInputError
from slimtorch.formats.atomic import fsync_dir, write_file
from slimtorch.formats.state import WeightState

log = logging.getLogger(__name__)

PROGRESS = "progress.json"
HOST = torch.device("cpu")
_T = TypeVar("_T")


@dataclass(frozen=True)
class OffloadPlan:
    """What the run writes: the output artifact, its manifest keys, and the work directory."""

    out: Path
    manifest: dict[str, Any]
    work_dir: Path
    fingerprint: str  # identifies model + recipe + calibration + world size: a resume must match
    overwrite: bool = False


def fingerprint(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def read_progress(plan: OffloadPlan, world: int) -> int:
    """Index of the last finished block (-1: none), after checking the run is the same one."""
    file = plan.work_dir / PROGRESS
    if not file.is_file():
        return -1
    state = json.loads(file.read_text())
    started = int(state.get("world", 1))
    if started != world:
        raise ConfigError(
            f"{plan.work_dir} holds a run started on {started} process(es), resumed on {world}:"
            f" each rank's saved inputs are its own shard of the calibration data; resume with"
            f" {started} (--nproc {started}, or torchrun with {started} ranks in all), or delete"
            f" {plan.work_dir} (or give another --work-dir) to start again on {world}"
        )
    if state.get("fingerprint") != plan.fingerprint:
        raise ConfigError(
            f"{plan.work_dir} holds a run with other model, recipe or calibration settings;"
            " delete it or give another --work-dir"
        )
    return int(state["done"])


class WorkDir:
    """One rank's view of the work directory (``comm`` None: a single process)."""

    def __init__(self, plan: OffloadPlan, comm: Comm | None) -> None:
        self.plan = plan
        self.comm = comm
        self.rank = comm.rank if comm is not None else 0
        self.world = comm.world if comm is not None else 1
        self.lead = self.rank == 0  # writes the blocks, the progress and the artifact

    @property
    def root(self) -> Path:
        return self.plan.work_dir

    def start(self) -> int:
        """The last finished block (-1: none), the same on every rank; a ConfigError on every
        rank when the work dir holds another run."""
        self.root.mkdir(parents=True, exist_ok=True)
        answer: dict[str, Any]
        if self.lead:
            try:
                answer = {"done": read_progress(self.plan, self.world)}
            except ConfigError as exc:
                answer = {"error": str(exc)}
        else:
            answer = {}
        if self.comm is not None:
            answer = self.comm.broadcast_json(answer, 0)
        if "error" in answer:
            raise ConfigError(answer["error"])
        done = int(answer["done"])
        if done >= 0:
            log.info("%s: resuming after block %d", self.root, done)
        return done

    def inputs_file(self, block: int) -> Path:
        return self.root / f"inputs{block:05d}.rank{self.rank}.safetensors"

    def save_inputs(self, block: int, inputs: Sequence[Inputs]) -> None:
        """This rank's inputs of ``block``, written atomically."""
        tensors = {f"h{i}": host(hidden_of(call)).contiguous() for i, call in enumerate(inputs)}
        path = self.inputs_file(block)
        tmp = path.with_suffix(".tmp")
        save_file(tensors, str(tmp))
        tmp.replace(path)

    def load_inputs(self, block: int, calls: Sequence[Inputs]) -> list[Inputs]:
        """This rank's saved inputs of ``block``, on the recorded ``calls`` of its shard, each
        on the device of the hidden states it replaces (:func:`input_device`)."""
        path = self.inputs_file(block)
        if not path.is_file():
            raise UserInputError(
                f"rank {self.rank}: {path} is missing, so block {block} cannot resume; every rank"
                f" needs its own files of {self.root} (give each node the same --work-dir on a"
                " disk that survives the run), or delete the work dir to start again"
            )
        saved = load_file(str(path))
        if len(saved) != len(calls):
            raise UserInputError(
                f"{path} holds {len(saved)} batches, this rank runs {len(calls)}; delete"
                f" {self.root} to start again"
            )
        return [with_hidden(c, saved[f"h{i}"].to(input_device(c))) for i, c in enumerate(calls)]

    def block_done(self, block: int) -> None:
        """Every rank finished ``block`` (barrier), then rank 0 marks it done. Inputs files of
        earlier blocks are dropped: rank 0 marked ``block - 1`` before this barrier."""
        if self.comm is not None:
            self.comm.barrier()
        if self.lead:
            state = {"fingerprint": self.plan.fingerprint, "done": block, "world": self.world}
            tmp = self.root / (PROGRESS + ".tmp")
            write_file(tmp, json.dumps(state).encode())
            os.replace(tmp, self.root / PROGRESS)
            fsync_dir(self.root)
        self._drop_inputs(below=block)

    def leave(self) -> None:
        """A rank other than 0 at the end: its files go (rank 0 removes the directory)."""
        self._drop_inputs(below=None)
        with contextlib.suppress(OSError):
            self.root.rmdir()  # empty only where this node's work dir was its own

    def _drop_inputs(self, below: int | None) -> None:
        pattern = re.compile(rf"inputs(\d+)\.rank{self.rank}\.safetensors")
        for path in self.root.glob(f"inputs*.rank{self.rank}.safetensors"):
            m = pattern.fullmatch(path.name)
            if m and (below is None or int(m.group(1)) < below):
                path.unlink(missing_ok=True)


def input_device(call: Inputs) -> torch.device:
    """Where a block call's hidden states live (the CPU when it records none): a resumed run's
    saved inputs go there, next to the rest of the call (masks, position embeddings)."""
    hidden = hidden_of(call)
    return hidden.device if isinstance(hidden, torch.Tensor) else HOST


def host(t: torch.Tensor, memo: dict[tuple[Any, ...], torch.Tensor] | None = None) -> torch.Tensor:
    """``t`` on the CPU: itself when it is there already (no copy), else a detached copy. With
    ``memo``, every tensor that is the same view of one device storage gets the same copy, so
    ties (an embedding and its LM head, a shared codebook) survive the move."""
    if t.device == HOST:
        return t
    if memo is None:
        return t.detach().to(HOST)
    key = (str(t.device), t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape),
           tuple(t.stride()), t.dtype)  # fmt: skip
    if key not in memo:
        memo[key] = t.detach().to(HOST)
    return memo[key]


def _host_fields(value: _T, memo: dict[tuple[Any, ...], torch.Tensor]) -> _T:
    """A dataclass (a compression state and the quantization state inside it) with every tensor
    field on the CPU; the same object when all are there already."""
    if isinstance(value, torch.Tensor):
        return host(value, memo)  # type: ignore[return-value]
    if not is_dataclass(value) or isinstance(value, type):
        return value
    changes = {}
    for f in fields(value):
        old = getattr(value, f.name)
        new = _host_fields(old, memo)
        if new is not old:
            changes[f.name] = new
    return replace(value, **changes) if changes else value


def to_host(
    tensors: dict[str, torch.Tensor], states: dict[str, WeightState]
) -> tuple[dict[str, torch.Tensor], dict[str, WeightState]]:
    """A part's tensors and compression states on the CPU, as the artifact writer gets them
    (:func:`host`: tensors already on the CPU are passed as they are, tied ones stay tied)."""
    memo: dict[tuple[Any, ...], torch.Tensor] = {}
    return (
        {k: host(v, memo) for k, v in tensors.items()},
        {k: _host_fields(v, memo) for k, v in states.items()},
    )


def place_buffers(model: nn.Module, device: torch.device) -> None:
    """Move the real buffers of ``model`` (rotary frequencies, ...) to ``device``; parameters
    are left alone (still on ``meta``: the offloaded run gives them their values there)."""
    for sub in model.modules():
        for name, buf in list(sub._buffers.items()):
            if buf is not None and buf.device.type != "meta" and buf.device != device:
                sub._buffers[name] = buf.to(device)
