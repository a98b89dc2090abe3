"""Recipe stage ``quantize.reconstruct``: block-wise reconstruction training (EfficientQAT's
Block-AP) of the quantized weights and step sizes, block by block on calibration data.

    - method: quantize.gptq                 # optional: start from GPTQ's codes and scales
      bits: 3
      group_size: 64
    - method: quantize.reconstruct
      train: {steps: 64, weight_lr: 1.0e-5, scale_lr: 1.0e-4}
      calibration: {samples: 64, batch_size: 4}

The sequential pipeline feeds each block the inputs the already reconstructed blocks produce
(only one block's inputs and outputs are held). A targeted Linear that already carries an affine
grid (``quantize.rtn`` / ``quantize.gptq`` before this stage) starts from it, and the target is
the block of the model as it was before the recipe (``run.original``); a Linear without a grid
starts from round-to-nearest on this stage's grid (``bits``, ``group_size``, ``symmetric``) and
the target is the block's own full-precision output. The result is stored like every affine
grid (codes, scales, zero points), so every exporter of quantize.rtn/gptq takes it.
"""

from __future__ import annotations

import copy
import logging
from typing import Any, Literal

from pydantic import Field
from torch import nn

from slimtorch.calibrate.sequential import (
    Accumulator,
    LayerwiseConfig,
    block_linears,
    run_layerwise,
)
from slimtorch.core.config import StrictModel
from slimtorch.core.errors import ConfigError
from slimtorch.core.methods import Run, register_method
from slimtorch.formats.state import QuantState, WeightState, apply_state, get_state
from slimtorch.quantize.affine import quantize_weight
from slimtorch.quantize.groups import AUTO_RULE, GroupSize, fix_group_size, resolved_spec
from slimtorch.quantize.primitives import QuantSpec
from slimtorch.quantize.reconstruct import (
    Inputs,
    LearnedGrid,
    TrainSettings,
    block_outputs,
    grid_from_state,
    grid_state,
    reconstruct_block,
)

log = logging.getLogger(__name__)
METHOD = "quantize.reconstruct"
CACHE_KEYS = ("cache", "past_key_value", "past_key_values", "layer_past")


class ReconstructTraining(StrictModel):
    """Training of one block (Adam, cosine decay; one calibration batch a step, cycling)."""

    steps: int = Field(default=64, ge=1, description="optimizer steps per block")
    weight_lr: float = Field(default=1e-5, gt=0, description="learning rate of the weights")
    scale_lr: float = Field(default=1e-4, gt=0, description="learning rate of the step sizes")


class ReconstructConfig(LayerwiseConfig):
    """Block-wise reconstruction (EfficientQAT Block-AP): each block's quantized weights and
    step sizes trained to match the full-precision block's outputs (MSE), block by block."""

    bits: int = Field(
        default=4, ge=2, le=8, description="grid of Linears not yet quantized (RTN start)"
    )
    symmetric: bool = False
    granularity: Literal["per_channel", "per_group"] = "per_group"
    group_size: GroupSize = Field(default="auto", description=AUTO_RULE)
    train: ReconstructTraining = Field(default_factory=ReconstructTraining)

    def spec(self) -> QuantSpec:
        return resolved_spec(self)


class _Replay:
    """An accumulator that keeps nothing: it only makes the pipeline run the block over its
    inputs, which the compressor's own hook records (with their keyword arguments)."""

    def update(self, x: Any) -> None:
        return None


class ReconstructCompressor:
    split = "block"  # a distributed run: the whole block by one rank

    def __init__(self, config: ReconstructConfig, run: Run) -> None:
        self.config = config
        self.run = run
        self.first = True
        self.calls: list[Inputs] = []
        self.handle: Any = None
        self.layers: dict[str, nn.Linear] = {}

    def _record(self, _m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        # a KV cache would grow (and keep autograd graphs) with every training step: dropped
        kept = {k: (None if k in CACHE_KEYS else v) for k, v in kwargs.items()}
        self.calls.append((args, kept))

    def observe(self, name: str, block: nn.Module) -> dict[str, Accumulator]:
        if not name:
            raise ConfigError(
                f"{METHOD} trains one repeated block at a time (the decoder layers of an LLM);"
                " this model has no list of repeated blocks holding Linear layers - use"
                " quantize.qat to train a quantized model as a whole"
            )
        self.layers = block_linears(block, name, self.config)
        if not self.layers:
            return {}
        fresh = {
            n: (m, "weight")
            for n, m in self.layers.items()
            if (s := get_state(m, "weight")) is None or s.quant is None
        }
        if fresh:  # Linears without a grid yet start from RTN on this stage's grid
            self.config = fix_group_size(self.config, METHOD, fresh, self.first)
            self.first = False
        self.calls = []
        self.handle = block.register_forward_pre_hook(self._record, with_kwargs=True)
        return {"": _Replay()}

    def compress(self, name: str, block: nn.Module, stats: dict[str, Accumulator]) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None
        calls, self.calls = self.calls, []
        if not self.layers or not calls:
            return
        starts = {n: get_state(m, "weight") for n, m in self.layers.items()}
        targets = block_outputs(self._teacher(name, block, starts), calls)
        started = {n: self._grid(m, starts[n]) for n, m in self.layers.items()}
        grids = {n: grid for n, (grid, _) in started.items()}
        result = reconstruct_block(block, grids, calls, targets, self._settings())
        for n, m in self.layers.items():
            old, (grid, like) = starts[n], started[n]
            state = grid_state(grid, like, tuple(m.weight.shape))
            mask = old.mask if old is not None else None
            extra = dict(old.extra) if old is not None else {}
            apply_state(m, "weight", WeightState(mask=mask, quant=state, extra=extra))
        log.info(
            "%s %s: block MSE %.4g -> %.4g%s", METHOD, name, result.loss_before,
            result.loss_after, "" if result.kept else " (start kept)",
        )  # fmt: skip

    def _settings(self) -> TrainSettings:
        t = self.config.train
        return TrainSettings(steps=t.steps, weight_lr=t.weight_lr, scale_lr=t.scale_lr)

    def _teacher(
        self, name: str, block: nn.Module, starts: dict[str, WeightState | None]
    ) -> nn.Module:
        """The full-precision block: the block itself when none of its targets is quantized yet,
        else the same block of the model before the recipe."""
        if not any(s is not None and s.quant is not None for s in starts.values()):
            return block
        original = self.run.original
        if original is None:
            raise ConfigError(
                f"{METHOD}: the Linears of {name} are already quantized and this run has no"
                " full-precision model to learn from; run it in the same recipe as the"
                " quantizer (after quantize.gptq / quantize.rtn) through slimtorch.compress"
            )
        try:
            return original.get_submodule(name)
        except AttributeError:
            raise ConfigError(
                f"{METHOD}: the model before the recipe has no block {name} (an earlier stage"
                " changed the blocks); put quantize.reconstruct right after the quantizer"
            ) from None

    def _grid(self, layer: nn.Linear, start: WeightState | None) -> tuple[LearnedGrid, QuantState]:
        """The learnable grid of ``layer`` and the state it starts from: the layer's own grid
        (its weight holds the dequantized codes), else RTN from the full-precision weight."""
        mask = start.mask if start is not None else None
        q = start.quant if start is not None else None
        if q is None:
            q = quantize_weight(layer.weight.detach(), self.config.spec(), mask)
        try:
            return grid_from_state(q, layer.weight, mask), q
        except ValueError as exc:
            raise ConfigError(
                f"{METHOD}: {exc}; start from quantize.rtn or quantize.gptq instead"
            ) from None


@register_method(
    METHOD,
    ReconstructConfig,
    "block-wise reconstruction (EfficientQAT Block-AP): quantized weights and step sizes"
    " trained block by block to match the full-precision block (after quantize.gptq or alone)",
    needs_data=True,
)
def reconstruct(model: nn.Module, config: ReconstructConfig, run: Run) -> None:
    run.require_task(METHOD)
    compressor = ReconstructCompressor(copy.deepcopy(config), run)
    blocks = run_layerwise(model, compressor, run, config, METHOD)
    log.info("%s: %d blocks", METHOD, len(blocks))
