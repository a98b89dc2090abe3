"""Round-to-nearest weight quantization recipes: ``quantize.rtn``, ``quantize.binary``, ``quantize.ternary``.

Each selected weight keeps its pruning mask; the parameter is overwritten with the quantized
values and the module records the grid (``formats.state.apply_state``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from slimtorch.calibrate.sequential import DataFree
from slimtorch.core.config import StageConfig
from slimtorch.core.context import Context
from slimtorch.core.methods import Run, register_method
from slimtorch.formats.state import QuantState, WeightState, apply_state, get_state
from slimtorch.graph.weights import WeightRef, select_weights
from slimtorch.quantize.affine import quantize_weight
from slimtorch.quantize.binary import binarize, ternarize
from slimtorch.quantize.primitives import QuantSpec

log = logging.getLogger(__name__)


class AffineOptions(StageConfig):
    """The affine grid options shared by ``quantize.rtn`` and ``quantize.qat``."""

    bits: int = Field(8, ge=2, le=8, description="bits per weight (2..8)")
    signed: bool = True
    symmetric: bool = True
    granularity: Literal["per_tensor", "per_channel", "per_group"] = "per_channel"
    group_size: int = Field(128, ge=1, description="input columns per group (per_group only)")

    def spec(self, observer: Literal["minmax", "mse"] = "minmax") -> QuantSpec:
        return QuantSpec(
            bits=self.bits,
            signed=self.signed,
            symmetric=self.symmetric,
            granularity=self.granularity,
            group_size=self.group_size if self.granularity == "per_group" else None,
            observer=observer,
        )


class RTNConfig(AffineOptions):
    """Round-to-nearest affine quantization of every selected weight."""

    observer: Literal["minmax", "mse"] = "minmax"


class BinaryConfig(StageConfig):
    """XNOR-Net binary weights (1 bit, one scale per output channel)."""


class TernaryConfig(StageConfig):
    """TWN ternary weights {-a, 0, +a} (2 bits, one scale per output channel)."""

    threshold_ratio: float = Field(0.7, gt=0, lt=1.5, description="delta = ratio * mean|w|")


def quantize_refs(
    refs: list[WeightRef],
    quantize: Callable[[torch.Tensor, torch.Tensor | None], QuantState],
    ctx: Context | None = None,
    desc: str = "quantize",
) -> None:
    """Quantize every weight of ``refs`` in place, keeping any pruning mask it carries."""
    items = ctx.progress_bar(refs, desc, len(refs)) if ctx is not None else iter(refs)
    for ref in items:
        old = get_state(ref.module, ref.param)
        mask = old.mask if old is not None else None
        q = quantize(ref.weight.detach(), mask)
        extra = dict(old.extra) if old is not None else {}
        apply_state(ref.module, ref.param, WeightState(mask=mask, quant=q, extra=extra))


def _rtn_blockwise(config: RTNConfig, run: Run) -> DataFree:
    """Offloaded compression: quantize each block as it streams by (names inside a block)."""
    return DataFree(lambda block: rtn(block, config, run))


@register_method(
    "quantize.rtn",
    RTNConfig,
    "round-to-nearest int2..int8 weights (per tensor/channel/group)",
    layerwise=_rtn_blockwise,
)
def rtn(model: nn.Module, config: RTNConfig, run: Run) -> None:
    refs = select_weights(model, config.targets, config.ignore)
    spec = config.spec(config.observer)
    quantize_refs(refs, lambda w, mask: quantize_weight(w, spec, mask), run.ctx, "quantize.rtn")
    log.info("quantize.rtn: %d weights to %d bits (%s)", len(refs), config.bits, config.granularity)


@register_method(
    "quantize.binary", BinaryConfig, "XNOR-Net binary weights: sign(w) * mean|w| per channel"
)
def binary(model: nn.Module, config: BinaryConfig, run: Run) -> None:
    refs = select_weights(model, config.targets, config.ignore)
    quantize_refs(refs, binarize, run.ctx, "quantize.binary")
    log.info("quantize.binary: %d weights", len(refs))


@register_method("quantize.ternary", TernaryConfig, "TWN ternary weights {-a, 0, +a} per channel")
def ternary(model: nn.Module, config: TernaryConfig, run: Run) -> None:
    refs = select_weights(model, config.targets, config.ignore)
    ratio = config.threshold_ratio
    quantize_refs(refs, lambda w, mask: ternarize(w, mask, ratio), run.ctx, "quantize.ternary")
    log.info("quantize.ternary: %d weights (ratio %.2f)", len(refs), ratio)
