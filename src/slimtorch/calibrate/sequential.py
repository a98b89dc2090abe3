"""Sequential layer-by-layer calibration: capture the inputs of block i, let a method compress
it from statistics of those inputs, run the compressed block to produce the inputs of block i+1.

This is how GPTQ, SparseGPT, Wanda, AWQ and SmoothQuant see a model: one block (a Transformer
layer) at a time, each fed with what the *already compressed* earlier blocks produce, so errors
are corrected downstream and only one block's activations are held. Each block gets its own
recorded call (attention mask, position embeddings: they differ between sliding-window and
global attention layers) with the hidden states of the blocks before it
(:mod:`slimtorch.calibrate.capture`). Blocks are found
generically: the longest ``nn.ModuleList`` of same-class modules that hold Linear layers (the
decoder layers of a Hugging Face LLM, ``encoder.layer`` of BERT); a model without one (a CNN,
the character LSTM) is one block.

Methods implement :class:`BlockCompressor`: which statistics to collect for which layers of a
block (``observe``), and how to compress the block from them (``compress``). Statistics see each
targeted layer's *input* (for a Linear: ``x`` of ``x @ W.T``; for an LSTM, its input sequence).

Under ``torchrun`` (:mod:`slimtorch.calibrate.distributed`) every rank runs its shard of the
batches, the statistics are combined across ranks, and a compressor's ``split`` attribute says
how its work is shared: ``"layers"`` (independent layers, each compressed by one owner rank:
``compress_layers`` and a ``layers`` table), ``"block"`` (the default: the whole block by one
rank; the others call ``skip`` if it has one), ``"replicated"`` (cheap and data-free: every
rank). Owners send their results, so every rank enters the next block with the same weights.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from pydantic import Field
from torch import nn

from slimtorch.calibrate import distributed
from slimtorch.calibrate.capture import (
    Forward,
    Inputs,
    _call,
    capture_block_inputs,
    capture_first_inputs,
    with_hidden,
)
from slimtorch.calibrate.statistics import AccumDtype, share_data_free
from slimtorch.core.config import StageConfig, StrictModel
from slimtorch.core.context import Context
from slimtorch.core.methods import Run
from slimtorch.core.targets import Targets
from slimtorch.runtime.moe import all_experts

log = logging.getLogger(__name__)


class Accumulator(Protocol):
    def update(self, x: torch.Tensor) -> None:
        """Feed one batch of a layer's inputs."""


class BlockCompressor(Protocol):
    def observe(self, name: str, block: nn.Module) -> dict[str, Accumulator]:
        """Accumulators keyed by the names (relative to ``block``) of the layers to observe."""

    def compress(self, name: str, block: nn.Module, stats: dict[str, Accumulator]) -> None:
        """Compress ``block`` in place from the statistics ``observe`` asked for."""


@dataclass(frozen=True)
class Blocks:
    """Where the repeated blocks live: ``container`` (dotted name) and the block names."""

    container: str
    names: list[str]


def find_blocks(model: nn.Module) -> Blocks:
    """The longest ModuleList of same-class blocks holding Linear layers; else the whole model."""
    best: tuple[int, str] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) < 2:
            continue
        kinds = {type(m) for m in module}
        has_linear = any(isinstance(x, nn.Linear) for x in module[0].modules())
        if len(kinds) == 1 and has_linear and (best is None or len(module) > best[0]):
            best = (len(module), name)
    if best is None:
        return Blocks("", [""])
    container = best[1]
    return Blocks(container, [f"{container}.{i}" for i in range(best[0])])


class _SharedInputs:
    """Layers that read the same input tensor (q/k/v, gate/up) need one accumulator, not one
    each: the first batch finds which layers share their input with an earlier one of the same
    accumulator type, later batches update only the first of each group (and check the others
    still read the same tensor)."""

    def __init__(self) -> None:
        self.alias: dict[str, str] = {}  # key -> the key whose accumulator it shares
        self.seen: dict[tuple[int, type], tuple[str, torch.Tensor]] = {}
        self.first = True
        self.broken = False

    def start_batch(self) -> None:
        self.seen = {}  # holds the batch's inputs alive, so no address is reused within it

    def should_update(self, key: str, x: torch.Tensor, acc: Accumulator) -> bool:
        found = self.seen.get((id(x), type(acc)))
        leader = found[0] if found is not None and found[1] is x else None
        if self.first:
            if leader is not None:
                self.alias[key] = leader
                return False
            self.seen[(id(x), type(acc))] = (key, x)
            return True
        if key in self.alias:
            self.broken |= leader != self.alias[key]
            return False
        self.seen[(id(x), type(acc))] = (key, x)
        return True


def observe_block(
    block: nn.Module, inputs: Sequence[Inputs], stats: dict[str, Accumulator]
) -> None:
    """Run ``block`` on every captured input, feeding each observed layer's input to its
    accumulator. Layers that read the same tensor share one accumulator (``stats`` is updated
    to point them at it)."""
    fresh = copy.deepcopy(stats)  # empty accumulators, for the rare rerun without sharing
    shared = _SharedInputs()
    _observe(block, inputs, stats, shared)
    if shared.broken:  # a layer stopped reading its group's tensor: observe every layer alone
        log.debug("shared calibration inputs differ between batches; observing every layer")
        stats.update(fresh)
        _observe(block, inputs, stats, None)
        return
    for key, leader in shared.alias.items():
        stats[key] = stats[leader]


def _observe(
    block: nn.Module,
    inputs: Sequence[Inputs],
    stats: dict[str, Accumulator],
    shared: _SharedInputs | None,
) -> None:
    handles = []
    for key, acc in stats.items():
        lname, _, param = key.partition(":")
        layer = block.get_submodule(lname) if lname else block
        if param:
            handles.append(layer.register_forward_hook(_rnn_hook(layer, param, acc)))
            continue

        def hook(
            _m: nn.Module, args: tuple[Any, ...], key: str = key, acc: Accumulator = acc
        ) -> None:
            if not args or not isinstance(args[0], torch.Tensor):
                return
            if shared is None or shared.should_update(key, args[0], acc):
                acc.update(args[0].detach())

        handles.append(layer.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            for args, kwargs in inputs:
                if shared is not None:
                    shared.start_batch()
                block(*args, **kwargs)
                if shared is not None:
                    shared.first = False
    finally:
        for h in handles:
            h.remove()
        if shared is not None:
            shared.seen = {}


def _rnn_hook(layer: nn.Module, param: str, acc: Accumulator) -> Callable[..., None]:
    """Inputs of one recurrent weight: ``weight_ih_l0`` reads the sequence, ``weight_hh_l0``
    the previous hidden state (zeros, then the outputs shifted by one step)."""
    batch_first = bool(getattr(layer, "batch_first", False))

    def hook(_m: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        x = args[0].detach()
        if param.startswith("weight_ih"):
            acc.update(x)
            return
        seq = (out[0] if isinstance(out, tuple) else out).detach()
        time_axis = 1 if batch_first else 0
        first = torch.zeros_like(seq.narrow(time_axis, 0, 1))
        prev = seq.narrow(time_axis, 0, seq.shape[time_axis] - 1)
        acc.update(torch.cat([first, prev], dim=time_axis))

    return hook


def next_inputs(
    block: nn.Module, inputs: Sequence[Inputs], following: Sequence[Inputs] | None = None
) -> list[Inputs]:
    """The inputs of the next block: this block's first output replaces the hidden states of
    ``following`` (the next block's own recorded calls, see :func:`capture_block_inputs`;
    default ``inputs``: the next block is called like this one)."""
    after = inputs if following is None else following
    out: list[Inputs] = []
    with torch.no_grad():
        for (args, kwargs), call in zip(inputs, after, strict=True):
            result = block(*args, **kwargs)
            hidden = result[0] if isinstance(result, (tuple, list)) else result
            out.append(with_hidden(call, hidden.detach()))
    return out


def run_sequential(
    model: nn.Module,
    batches: Iterable[Any],
    compressor: BlockCompressor,
    ctx: Context,
    forward: Forward = _call,
    on_block_done: Callable[[int, str], None] | None = None,
) -> list[str]:
    """Compress ``model`` block by block (see the module docstring); returns the block names.
    Without a KV cache: one kept between the passes over a block (observe, then the next
    block's inputs) would feed the keys and values of the block before compression to the
    second pass, so the next block would not see the compressed block's output."""
    was_training = model.training
    config = getattr(model, "config", None)
    cached = getattr(config, "use_cache", None)
    if cached:
        config.use_cache = False  # type: ignore[union-attr]
    model.eval()
    comm = distributed.active()
    try:
        if comm is not None:
            batches = distributed.shard(list(batches), comm)
        blocks = find_blocks(model)
        if blocks.names == [""]:
            inputs = capture_first_inputs(model, model, batches, forward)
            compress_block(model, "", inputs, compressor, comm)
        else:
            modules = [model.get_submodule(n) for n in blocks.names]
            calls = capture_block_inputs(model, modules, batches, forward)
            inputs = calls[0]
            bar = ctx.progress_bar(list(enumerate(blocks.names)), "blocks", len(blocks.names))
            for i, name in bar:
                block = modules[i]
                if comm is not None:
                    distributed.check_fault(comm, i)
                compress_block(block, name, inputs, compressor, comm)
                if i + 1 < len(blocks.names):
                    inputs = next_inputs(block, inputs, calls[i + 1])
                    calls[i] = calls[i + 1] = []  # free what only these blocks needed
                if on_block_done is not None:
                    on_block_done(i, name)
        if comm is not None:  # each layer was noted on its owner rank: every rank gets all
            share_data_free([compressor], comm)
        return blocks.names
    finally:
        model.train(was_training)
        if cached:
            config.use_cache = cached  # type: ignore[union-attr]


def compress_block(
    block: nn.Module,
    name: str,
    inputs: Sequence[Inputs],
    compressor: BlockCompressor,
    comm: distributed.Comm | None = None,
) -> None:
    """Observe ``block`` on ``inputs`` and compress it; with ``comm`` (a distributed run),
    combine the statistics of every rank first and share the compression out (module
    docstring)."""
    stats = compressor.observe(name, block)
    if stats:
        observe_block(block, inputs, stats)
    if comm is None:
        compressor.compress(name, block, stats)
        log.debug("compressed block %s", name or "<model>")
        return
    distributed.compress_shared(block, name, compressor, stats, comm)


class CalibrationOptions(StrictModel):
    """How much calibration data a layer-wise method sees (batches of the task's data)."""

    samples: int = Field(default=128, ge=1, description="calibration sequences / examples")
    batch_size: int = Field(default=8, ge=1)
    calibrate_all_experts: bool = Field(
        default=False,
        description="mixture-of-experts: every expert also sees every calibration token (its"
        " statistics); the layer's output stays the router's choice",
    )


class LayerwiseCalibration(CalibrationOptions):
    """The calibration of the layer-wise methods: also how their statistics are summed."""

    sum_dtype: AccumDtype = Field(
        default="float64",
        description="dtype of the running sums of the statistics (GPTQ's and SparseGPT's"
        " Hessians, Wanda's input norms; the other methods keep none) and of what a distributed"
        " run sends of them: float64 is exact, bit-identical on any number of processes;"
        " float32 halves their memory and bytes, within a bound (docs/distributed.md)",
    )


class LayerwiseConfig(StageConfig):
    """Options shared by the layer-wise methods (GPTQ, SparseGPT, Wanda, AWQ, SmoothQuant)."""

    calibration: LayerwiseCalibration = Field(default_factory=LayerwiseCalibration)


def calibration_batches(run: Run, options: CalibrationOptions, method: str) -> list[Any]:
    task = run.require_task(method)
    steps = max(1, -(-options.samples // options.batch_size))
    return list(task.train_batches(run.ctx, steps, options.batch_size))


def run_layerwise(
    model: nn.Module, compressor: BlockCompressor, run: Run, config: LayerwiseConfig, method: str
) -> list[str]:
    """The in-memory path of a layer-wise recipe stage: calibrate on the task's data."""
    batches = calibration_batches(run, config.calibration, method)
    task = run.require_task(method)
    with all_experts(model, config.calibration.calibrate_all_experts):
        return run_sequential(model, batches, compressor, run.ctx, forward=task.forward)


def block_layers(
    block: nn.Module, block_name: str, config: StageConfig, kinds: tuple[type, ...]
) -> dict[str, nn.Module]:
    """The layers of ``block`` of one of ``kinds`` selected by the stage's targets/ignore
    (matched on their full names); the model's LM head is never inside a block."""
    sel = Targets.of(config.targets, config.ignore)
    out: dict[str, nn.Module] = {}
    for rel, module in block.named_modules():
        full = f"{block_name}.{rel}" if block_name and rel else block_name or rel
        if isinstance(module, kinds) and sel.selects(full, block.get_submodule(rel)):
            out[rel] = block.get_submodule(rel)
    return out


def block_matrices(
    block: nn.Module, block_name: str, config: StageConfig
) -> dict[str, tuple[nn.Module, str]]:
    """Weight matrices whose inputs the pipeline can capture: every targeted Linear
    (``name`` -> (layer, "weight")) and the gate weights of single-layer unidirectional
    LSTM/GRU layers (``name:weight_ih_l0`` and ``name:weight_hh_l0``)."""
    out: dict[str, tuple[nn.Module, str]] = {
        n: (m, "weight") for n, m in block_linears(block, block_name, config).items()
    }
    for rel, rnn in block_layers(block, block_name, config, (nn.LSTM, nn.GRU)).items():
        if getattr(rnn, "num_layers", 1) != 1 or getattr(rnn, "bidirectional", False):
            log.warning(
                "%s: layer-wise methods capture the inputs of single-layer unidirectional"
                " LSTM/GRU only; this one is left as it is",
                f"{block_name}.{rel}".strip("."),
            )
            continue
        if getattr(rnn, "proj_size", 0):
            continue
        for param in ("weight_ih_l0", "weight_hh_l0"):
            out[f"{rel}:{param}"] = (rnn, param)
    return out


def matrix_weight(layer: nn.Module, param: str) -> torch.Tensor:
    """The weight ``param`` of ``layer`` (an entry of :func:`block_matrices`)."""
    weight = getattr(layer, param)
    assert isinstance(weight, torch.Tensor)
    return weight


def block_linears(block: nn.Module, block_name: str, config: StageConfig) -> dict[str, nn.Linear]:
    """The ``nn.Linear`` layers of ``block`` the stage targets (see :func:`block_layers`)."""
    found = block_layers(block, block_name, config, (nn.Linear,))
    return {n: m for n, m in found.items() if isinstance(m, nn.Linear)}


class DataFree:
    """A block compressor that needs no statistics: ``fn(block)`` compresses the block."""

    split = "replicated"  # a distributed run: cheap and data-free, every rank runs it

    def __init__(self, fn: Callable[[nn.Module], None]) -> None:
        self.fn = fn

    def observe(self, name: str, block: nn.Module) -> dict[str, Accumulator]:
        return {}

    def compress(self, name: str, block: nn.Module, stats: dict[str, Accumulator]) -> None:
        self.fn(block)
