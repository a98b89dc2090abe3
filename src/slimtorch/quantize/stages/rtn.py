"""Round-to-nearest weight quantization recipes: ``quantize.rtn``, ``quantize.binary``, ``quantize.ternary``.

Each selected weight keeps its pruning mask; the parameter is overwritten with the quantized
values and the module records the grid (``formats.state.apply_state``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from slimtorch.calibrate.sequential import DataFree
from slimtorch.core.config import StageConfig
from slimtorch.core.context import Context
from slimtorch.core.errors import TargetError
from slimtorch.core.methods import Run, register_method
from slimtorch.formats.state import QuantState, WeightState, apply_state, get_state, to_matrix
from slimtorch.graph.weights import WeightRef, select_weights
from slimtorch.quantize.affine import quantize_weight
from slimtorch.quantize.binary import binarize, ternarize
from slimtorch.quantize.groups import AUTO_RULE, GroupSize, resolve_group_size
from slimtorch.quantize.primitives import QuantSpec

log = logging.getLogger(__name__)


class AffineOptions(StageConfig):
    """The affine grid options shared by ``quantize.rtn`` and ``quantize.qat``."""

    bits: int = Field(8, ge=2, le=8, description="bits per weight (2..8)")
    signed: bool = True
    symmetric: bool = True
    granularity: Literal["per_tensor", "per_channel", "per_group"] = "per_channel"
    group_size: GroupSize = Field(128, description=AUTO_RULE)
    full_range: bool = Field(
        False,
        description="symmetric grids: use all 2**bits codes (llama.cpp's Q4_0 grid: the scale's"
        " sign puts each group's largest-magnitude weight on the extra negative code)",
    )

    @model_validator(mode="after")
    def _group(self) -> AffineOptions:
        if isinstance(self.group_size, int) and self.group_size < 1:
            raise ValueError(f"group_size={self.group_size}; use 1 or more, or 'auto'")
        if self.full_range and not (self.symmetric and self.signed):
            raise ValueError("full_range needs symmetric: true and signed: true")
        return self

    def spec(
        self,
        observer: Literal["minmax", "mse"] = "minmax",
        refs: Sequence[WeightRef] = (),
        stage: str = "quantize.rtn",
    ) -> QuantSpec:
        """The grid; a per-group size is resolved (``auto``) and checked against ``refs``."""
        group = None
        if self.granularity == "per_group":
            group = resolve_group_size(stage, self.group_size, in_features_of(refs))
        return QuantSpec(
            bits=self.bits,
            signed=self.signed,
            symmetric=self.symmetric,
            granularity=self.granularity,
            group_size=group,
            observer=observer,
            full_range=self.full_range,
        )


def in_features_of(refs: Sequence[WeightRef]) -> dict[str, int]:
    """Input features of each weight's matrix view, by weight name."""
    return {r.name: int(to_matrix(r.weight.detach()).shape[1]) for r in refs}


class RTNConfig(AffineOptions):
    """Round-to-nearest affine quantization of every selected weight."""

    observer: Literal["minmax", "mse"] = "minmax"
    missing: Literal["error", "skip"] = Field(
        "error",
        description="when the targets match no layer: 'error', or 'skip' the stage (a preset's"
        " stage for the embeddings and LM head of models that may have none)",
    )


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
    """Quantize every weight of ``refs`` in place, keeping any pruning mask it carries. A
    parameter shared by several modules (a tied embedding and LM head) is quantized once and
    every sharer records the same state, so the artifact stores it once."""
    items = ctx.progress_bar(refs, desc, len(refs)) if ctx is not None else iter(refs)
    done: dict[int, QuantState] = {}
    for ref in items:
        old = get_state(ref.module, ref.param)
        mask = old.mask if old is not None else None
        key = id(ref.weight)
        if key not in done:
            done[key] = quantize(ref.weight.detach(), mask)
        extra = dict(old.extra) if old is not None else {}
        apply_state(ref.module, ref.param, WeightState(mask=mask, quant=done[key], extra=extra))


def part_by_part(config: StageConfig, apply: Callable[[nn.Module, Any], int | None]) -> DataFree:
    """The layer-wise form of a data-free weight stage (offloaded runs, ``--max-memory``):
    ``apply(part, config)`` on each block as it streams by, then on the layers outside the
    blocks (embeddings, LM head: the offloaded run calls it on the model without its blocks).
    A part with no target is skipped (the offloaded run checks ``missing: error`` against the
    whole model up front). ``apply`` returns the group size it used, if any: an ``auto`` group
    size is chosen at the first part and kept."""
    chosen: list[int] = []
    each = config.model_copy(update={"missing": "skip"})

    def one(part: nn.Module) -> None:
        fixed = each.model_copy(update={"group_size": chosen[0]}) if chosen else each
        size = apply(part, fixed)
        if size is not None and not chosen:
            chosen.append(size)

    return DataFree(one)


def _rtn_blockwise(config: RTNConfig, run: Run) -> DataFree:
    def apply(part: nn.Module, each: RTNConfig) -> int | None:
        spec = quantize_selected(part, each, run)
        return spec.group_size if spec is not None else None

    return part_by_part(config, apply)


def quantize_selected(model: nn.Module, config: RTNConfig, run: Run) -> QuantSpec | None:
    """Quantize the weights ``config`` selects; returns the grid used, None when ``missing:
    skip`` skipped the stage."""
    try:
        refs = select_weights(model, config.targets, config.ignore)
    except TargetError:
        if config.missing == "error":
            raise
        log.info("quantize.rtn: targets %s match no layer here; skipped", config.targets)
        return None
    spec = config.spec(config.observer, refs)
    quantize_refs(refs, lambda w, mask: quantize_weight(w, spec, mask), run.ctx, "quantize.rtn")
    log.info("quantize.rtn: %d weights to %d bits (%s)", len(refs), config.bits, config.granularity)
    return spec


@register_method(
    "quantize.rtn",
    RTNConfig,
    "round-to-nearest int2..int8 weights (per tensor/channel/group)",
    layerwise=_rtn_blockwise,
)
def rtn(model: nn.Module, config: RTNConfig, run: Run) -> None:
    quantize_selected(model, config, run)


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
