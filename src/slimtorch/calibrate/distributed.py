"""Data-parallel layer-wise calibration on ``torch.distributed`` (docs/distributed.md).

Launched by ``torchrun`` (or ``slimtorch compress --nproc N``), every process (rank) holds the
whole model and a contiguous shard of the calibration batches, in rank order. Per block: each
rank runs its shard through the block; the statistics are combined (:meth:`Comm.sum` of the
running sums, float64 unless ``calibration.sum_dtype: float32``, :meth:`Comm.maximum`, rows
concatenated in rank order: ``Accumulator.reduce``); each layer is compressed once, on the rank
:func:`assign_owners` gives it (greedy by ``out * in^2``, the cost of GPTQ/SparseGPT), and its
weight and compression state are broadcast from there, so every rank enters the next block
with the same bits. Compressors whose layers are coupled (AWQ, SmoothQuant: scales folded into
a norm) are compressed whole by one rank, round-robin over the blocks; cheap data-free ones
(RTN) run on every rank.

The pure parts (:func:`shard_range`, :func:`assign_owners`, :func:`layer_cost`,
:func:`state_header`) take no process group. Technique folders only see the ``Reducer``
protocol of :mod:`slimtorch.calibrate.statistics` and the ``split`` of their compressors.
"""

from __future__ import annotations

import datetime
import faulthandler
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any, NoReturn

import torch
import torch.distributed as dist
from torch import nn

from slimtorch.calibrate.statistics import agree_shared, shared_links
from slimtorch.core.errors import ConfigError, UserInputError
from slimtorch.formats.state import (
    QuantState,
    WeightState,
    apply_state,
    get_state,
    iter_states,
    set_state,
)
from slimtorch.runtime.moe import ExpertMLP

log = logging.getLogger(__name__)

FAULT_ENV = "SLIMTORCH_DIST_FAULT"  # testing hook: "RANK:BLOCK:kill|raise"
TIMEOUT_ENV = "SLIMTORCH_DIST_TIMEOUT"  # seconds a collective may wait (default 1800)


class DistributedError(UserInputError):
    """A distributed run failed: one message for the whole job (``exit_code`` for the CLI)."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class PeerLostError(RuntimeError):
    """A collective failed: another rank died or timed out (a consequence, not the cause)."""


# ---------------------------------------------------------------- pure parts


def shard_range(items: int, rank: int, world: int) -> tuple[int, int]:
    """``[start, stop)`` of rank ``rank``'s contiguous share of ``items`` (the first
    ``items % world`` ranks get one more). Contiguous and in rank order, so that rank-order
    concatenation gives back the single-process order."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in a world of {world}")
    base, extra = divmod(items, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def layer_cost(shape: Sequence[int]) -> int:
    """Work of compressing a ``[out, in]`` weight by a second-order method: ``out * in^2``."""
    out = int(shape[0])
    inner = 1
    for d in shape[1:]:
        inner *= int(d)
    return out * inner * inner


def assign_owners(costs: dict[str, int], world: int) -> dict[str, int]:
    """The rank that compresses each layer: longest job first onto the least loaded rank
    (ties: the lower rank). Deterministic, so every rank computes the same table."""
    load = [0] * world
    owners: dict[str, int] = {}
    for name in sorted(costs, key=lambda n: (-costs[n], n)):
        rank = min(range(world), key=lambda r: (load[r], r))
        owners[name] = rank
        load[rank] += costs[name]
    return owners


_QUANT_TENSORS = ("codes", "scale", "zero_point", "codebook", "global_scale")


def state_header(state: WeightState | None) -> tuple[dict[str, Any], list[torch.Tensor]]:
    """A weight state as a JSON-able header and its tensors (in the header's order)."""
    if state is None:
        return {"none": True}, []
    tensors: list[torch.Tensor] = []
    specs: list[list[Any]] = []

    def put(tag: str, t: torch.Tensor | None) -> None:
        if t is not None:
            specs.append([tag, str(t.dtype).removeprefix("torch."), list(t.shape)])
            tensors.append(t.detach().contiguous())

    put("mask", state.mask)
    quant = None
    if state.quant is not None:
        q = state.quant
        quant = {f.name: getattr(q, f.name) for f in fields(q) if f.name not in _QUANT_TENSORS}
        for tag in _QUANT_TENSORS:
            put(tag, getattr(q, tag))
    return {"quant": quant, "extra": state.extra, "tensors": specs}, tensors


def state_from_header(header: dict[str, Any], tensors: Sequence[torch.Tensor]) -> WeightState:
    if header.get("none"):
        raise ValueError("no state")
    got = {spec[0]: t for spec, t in zip(header["tensors"], tensors, strict=True)}
    quant = None
    if header["quant"] is not None:
        values: dict[str, Any] = {**header["quant"], **{t: got.get(t) for t in _QUANT_TENSORS}}
        quant = QuantState(**values)
    return WeightState(mask=got.get("mask"), quant=quant, extra=dict(header["extra"]))


# ---------------------------------------------------------------- the process group


@dataclass
class Comm:
    """The process group of a run, with the bytes this rank hands to collectives counted."""

    rank: int
    world: int
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    sent: int = 0  # payload bytes this rank contributed (all_reduce/all_gather input, root's
    # broadcast); a ring all_reduce moves about 2 (world-1)/world times that over the wire
    blocks: list[tuple[str, int]] = field(default_factory=list)  # (block, bytes sent in it)
    _owner_turn: int = 0

    def _run(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (RuntimeError, dist.DistBackendError) as exc:
            stopped = f"rank {self.rank}: {what} failed ({exc}); another rank stopped"
            raise PeerLostError(stopped) from exc

    def _out(self, t: torch.Tensor) -> torch.Tensor:
        return t.detach().to(self.device).contiguous()

    def _all_reduce(self, t: torch.Tensor, op: str) -> torch.Tensor:
        buf = self._out(t)
        self.sent += buf.numel() * buf.element_size()
        self._run("all_reduce", dist.all_reduce, buf, op=getattr(dist.ReduceOp, op))
        return buf.to(t.device)

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        return self._all_reduce(t, "SUM")

    def maximum(self, t: torch.Tensor) -> torch.Tensor:
        return self._all_reduce(t, "MAX")

    def total(self, n: int) -> int:
        return int(self.sum(torch.tensor([n], dtype=torch.int64)).item())

    def gather(self, t: torch.Tensor) -> list[torch.Tensor]:
        buf = self._out(t)
        self.sent += buf.numel() * buf.element_size()
        parts = [torch.empty_like(buf) for _ in range(self.world)]
        self._run("all_gather", dist.all_gather, parts, buf)
        return [p.to(t.device) for p in parts]

    def first_rows(self, rows: torch.Tensor, limit: int) -> torch.Tensor:
        shape = torch.tensor(list(rows.shape) if rows.dim() == 2 else [0, 0], dtype=torch.int64)
        shapes = [tuple(int(v) for v in s) for s in self.gather(shape)]
        width = max(s[1] for s in shapes)
        most = max(s[0] for s in shapes)
        padded = torch.zeros(most, width, dtype=torch.float32)
        padded[: rows.shape[0]] = rows.reshape(-1, width) if rows.numel() else padded[:0]
        parts = self.gather(padded)
        return torch.cat([p[: s[0]] for p, s in zip(parts, shapes, strict=True)])[:limit]

    def broadcast(self, t: torch.Tensor, src: int) -> torch.Tensor:
        """``t`` of rank ``src`` on every rank (the others' ``t`` gives shape and dtype)."""
        if t.dtype == torch.bool:  # not every backend sends bool
            return self.broadcast(t.to(torch.uint8), src).to(torch.bool)
        buf = self._out(t)
        if self.rank == src:
            self.sent += buf.numel() * buf.element_size()
        self._run("broadcast", dist.broadcast, buf, src=src)
        return buf.to(t.device)

    def broadcast_json(self, value: Any, src: int) -> Any:
        data = json.dumps(value).encode() if self.rank == src else b""
        size = self.broadcast(torch.tensor([len(data)], dtype=torch.int64), src)
        raw = torch.zeros(int(size.item()), dtype=torch.uint8)
        if self.rank == src:
            raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        return json.loads(bytes(self.broadcast(raw, src).tolist()).decode())

    def gather_json(self, value: Any) -> list[Any]:
        """Every rank's ``value`` (small JSON: names, notes) in rank order, on every rank."""
        return [self.broadcast_json(value, src) for src in range(self.world)]

    def barrier(self) -> None:
        self._run("barrier", dist.barrier)

    def next_owner(self) -> int:
        """Round-robin owner of a whole block (compressors whose layers are coupled)."""
        owner = self._owner_turn % self.world
        self._owner_turn += 1
        return owner


_ACTIVE: list[Comm] = []  # the run's process group, set by init_from_env (torch's is global too)


def active() -> Comm | None:
    """The distributed run this process belongs to, if any."""
    return _ACTIVE[0] if _ACTIVE else None


def launched() -> bool:
    """Whether this process was started by torchrun for more than one rank."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env(device: str = "cpu") -> Comm:
    """Join the process group torchrun described in the environment: gloo on CPU, NCCL when
    ``device`` is CUDA. Collectives wait at most $SLIMTORCH_DIST_TIMEOUT seconds (1800)."""
    if _ACTIVE:
        return _ACTIVE[0]
    try:
        seconds = float(os.environ.get(TIMEOUT_ENV, "1800"))
    except ValueError:
        raise ConfigError(f"${TIMEOUT_ENV} must be a number of seconds") from None
    cuda = device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise ConfigError("--device cuda with torchrun needs CUDA; use --device cpu (gloo)")
    backend = "nccl" if cuda else "gloo"
    local = int(os.environ.get("LOCAL_RANK", "0"))
    target = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(target)
    if not faulthandler.is_enabled():  # a rank dying in native code says where it was
        faulthandler.enable()
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=seconds))
    comm = Comm(dist.get_rank(), dist.get_world_size(), target)
    _ACTIVE.append(comm)
    log.info("rank %d of %d (%s)", comm.rank, comm.world, backend)
    return comm


def shutdown() -> None:
    _ACTIVE.clear()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def exit_rank(code: int) -> NoReturn:
    """End a torchrun rank with ``code``: leave the process group, flush, and exit without the
    interpreter's native teardown. Ranks that had finished their work and destroyed the group
    still aborted at exit now and then (SIGABRT, "terminate called without an active
    exception", no Python frame left: a gloo/c10d thread still joinable when the process
    ends), and torchrun then reported a finished job as failed."""
    shutdown()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def traffic(comm: Comm) -> dict[str, Any]:
    """Bytes each rank sent per block (a collective: every rank calls it)."""
    mine = torch.tensor([b for _, b in comm.blocks], dtype=torch.int64)
    every = comm.gather(mine)
    return {
        "world": comm.world,
        "blocks": [n for n, _ in comm.blocks],
        "bytes_sent_per_block": [[int(v) for v in t.tolist()] for t in every],
        "bytes_sent": [int(t.sum()) for t in every],
    }


def check_fault(comm: Comm, block: int) -> None:
    """Testing hook ($SLIMTORCH_DIST_FAULT=RANK:BLOCK:kill|raise): this rank dies at a block."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    rank, at, how = spec.split(":")
    if int(rank) == comm.rank and int(at) == block:
        if how == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise RuntimeError(f"injected failure on rank {comm.rank} at block {block}")


# ---------------------------------------------------------------- the block step


def shard(batches: Sequence[Any], comm: Comm) -> list[Any]:
    """This rank's contiguous share of the calibration batches."""
    if len(batches) < comm.world:
        raise ConfigError(
            f"{len(batches)} calibration batches for {comm.world} ranks: every rank needs one;"
            " raise calibration.samples or lower calibration.batch_size"
        )
    start, stop = shard_range(len(batches), comm.rank, comm.world)
    return list(batches[start:stop])


def reduce_stats(stats: dict[str, Any], comm: Comm, experts: bool = False) -> None:
    """Combine every accumulator over the ranks (shared ones once), in a fixed key order. In a
    block of ``experts``, which layers share one can differ between ranks: agreed first."""
    if experts:
        agree_shared(stats, comm.gather_json(shared_links(stats)))
    done: set[int] = set()
    for key in sorted(stats):
        acc = stats[key]
        if id(acc) in done:
            continue
        done.add(id(acc))
        reduce = getattr(acc, "reduce", None)
        if reduce is None:
            raise ConfigError(
                f"{type(acc).__name__} cannot be combined across ranks (no reduce method);"
                " run this stage in one process"
            )
        reduce(comm)


def send_matrix(layer: nn.Module, param: str, src: int, comm: Comm) -> None:
    """One weight and its compression state, from rank ``src`` to every rank. A quantized
    weight's values are its state's (``apply_state``: what the artifact stores), so only the
    state travels; other weights (SparseGPT's updated ones) travel too."""
    if not send_matrix_state(layer, param, src, comm):
        weight = getattr(layer, param)
        with torch.no_grad():
            weight.copy_(comm.broadcast(weight.detach(), src).to(weight.dtype))


def send_block(block: nn.Module, src: int, comm: Comm) -> None:
    """Every parameter, buffer and compression state of ``block``, from rank ``src``."""
    with torch.no_grad():
        for t in list(block.parameters()) + list(block.buffers()):
            t.copy_(comm.broadcast(t.detach(), src).to(t.dtype))
    names = [[m, p] for m, _, p, _ in iter_states(block)] if comm.rank == src else []
    for mname, param in comm.broadcast_json(names, src):
        send_matrix_state(block.get_submodule(mname), param, src, comm)


def send_matrix_state(layer: nn.Module, param: str, src: int, comm: Comm) -> bool:
    """The compression state of one weight, from rank ``src``; True when it is quantized and
    the receivers have set the weight's values from it."""
    header, tensors = state_header(get_state(layer, param))
    header = comm.broadcast_json(header, src)
    empty = (torch.empty(s[2], dtype=getattr(torch, s[1])) for s in header.get("tensors", []))
    got = [comm.broadcast(t, src) for t in (tensors if comm.rank == src else empty)]
    if header.get("none"):
        return False
    if comm.rank != src:
        state = state_from_header(header, got)
        if state.quant is not None:
            apply_state(layer, param, state)  # the same bits the owner's apply_state wrote
        else:
            set_state(layer, param, state)
    return header["quant"] is not None


def compress_shared(
    block: nn.Module, name: str, compressor: Any, stats: dict[str, Any], comm: Comm
) -> None:
    """Combine ``stats`` over the ranks, compress ``block`` as the compressor's ``split``
    says (see :mod:`slimtorch.calibrate.sequential`) and send the results from their owners."""
    sent = comm.sent
    if stats:
        reduce_stats(stats, comm, any(isinstance(m, ExpertMLP) for m in block.modules()))
    split = getattr(compressor, "split", "block")
    if split == "replicated":
        compressor.compress(name, block, stats)
    elif split == "layers":
        layers: dict[str, tuple[nn.Module, str]] = compressor.layers
        costs = {k: layer_cost(getattr(m, p).shape) for k, (m, p) in layers.items()}
        owners = assign_owners(costs, comm.world)
        mine = [k for k in layers if owners[k] == comm.rank]
        compressor.compress_layers(name, block, stats, mine)
        for key, (layer, param) in layers.items():
            send_matrix(layer, param, owners[key], comm)
    else:
        owner = comm.next_owner()
        if owner == comm.rank:
            compressor.compress(name, block, stats)
        elif hasattr(compressor, "skip"):
            compressor.skip(name, block, stats)
        send_block(block, owner, comm)
    last = comm.blocks.pop() if comm.blocks and comm.blocks[-1][0] == name else (name, 0)
    comm.blocks.append((name, last[1] + comm.sent - sent))  # offloaded: every stage of a block
