"""``quantize.hqq``: calibration-free half-quadratic quantization (HQQ) of weights.

Asymmetric unsigned codes per group of input columns with min-max fp16 scales and the zero
points HQQ's proximal solver finds (``slimtorch.quantize.hqq``). ``zero_point: float`` (the
paper's, and mobiusml/hqq's) stores fractional zero points (fp16 where the scales are); the
``integer`` variant keeps whole-number zero points, which every consumer of slimtorch's
asymmetric grids reads (compressed-tensors, the int4 kernel, ONNX), and lets the solver move
the scale instead.
"""

from __future__ import annotations

import logging
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from slimtorch.calibrate.sequential import DataFree
from slimtorch.core.config import StageConfig
from slimtorch.core.errors import ConfigError, TargetError
from slimtorch.core.methods import Run, register_method
from slimtorch.formats.state import QuantState, dequantize
from slimtorch.graph.weights import select_weights
from slimtorch.quantize.groups import AUTO_RULE, GroupSize, resolve_group_size
from slimtorch.quantize.hqq import HQQParams, hqq_quantize
from slimtorch.quantize.stages.rtn import in_features_of, part_by_part, quantize_refs

log = logging.getLogger(__name__)


class HQQConfig(StageConfig):
    """HQQ: per-group zero points by half-quadratic optimisation of the lp error, no data."""

    bits: int = Field(4, ge=1, le=8, description="bits per weight (1..8)")
    granularity: Literal["per_channel", "per_group"] = "per_group"
    group_size: GroupSize = Field(64, description=AUTO_RULE)
    axis: Literal[1] = Field(
        1,
        description="hqq's grouping axis: 1, groups of consecutive input columns of a row"
        " (hqq's default); hqq's axis 0 (groups down a column) has no slimtorch storage",
    )
    iterations: int = Field(20, ge=1, le=10_000, description="solver steps (early stop first)")
    lp_norm: float = Field(0.7, gt=0, le=1, description="p of the lp error minimised (p <= 1)")
    beta: float = Field(10.0, gt=0, description="initial weight of the quadratic coupling")
    kappa: float = Field(1.01, ge=1, description="beta grows by this factor every step")
    zero_point: Literal["float", "integer"] = Field(
        "float",
        description="float: HQQ's fractional zero points; integer: whole zero points (every"
        " export target), the solver refits the scale instead (lower weight error than RTN,"
        " but no better KL divergence on smollm2-135m at 4 bits)",
    )
    missing: Literal["error", "skip"] = Field(
        "error", description="when the targets match no layer: 'error', or 'skip' the stage"
    )

    @model_validator(mode="after")
    def _group(self) -> HQQConfig:
        if isinstance(self.group_size, int) and self.group_size < 1:
            raise ValueError(f"group_size={self.group_size}; use 1 or more, or 'auto'")
        return self

    def params(self) -> HQQParams:
        return HQQParams(
            iterations=self.iterations,
            lp_norm=self.lp_norm,
            beta=self.beta,
            kappa=self.kappa,
            integer_zero=self.zero_point == "integer",
        )


def check_fractional_zero() -> None:
    """ConfigError unless ``formats.state`` dequantizes a fractional zero point as it is."""
    probe = QuantState(
        scheme="affine",
        bits=4,
        signed=False,
        granularity="per_channel",
        codes=torch.zeros(1, 1, dtype=torch.uint8),
        scale=torch.ones(1, 1),
        zero_point=torch.full((1, 1), 0.5),
    )
    if float(dequantize(probe, (1, 1))) != -0.5:
        raise ConfigError(
            "quantize.hqq: this slimtorch stores whole-number zero points only, so HQQ's"
            " fractional ones would be truncated; use zero_point: integer"
        )


def hqq_selected(model: nn.Module, config: HQQConfig, run: Run) -> int | None:
    """Quantize the weights ``config`` selects; the group size used (``None``: per channel,
    or the stage skipped under ``missing: skip``)."""
    try:
        refs = select_weights(model, config.targets, config.ignore)
    except TargetError:
        if config.missing == "error":
            raise
        log.info("quantize.hqq: targets %s match no layer here; skipped", config.targets)
        return None
    if config.zero_point == "float":
        check_fractional_zero()
    size = None
    if config.granularity == "per_group":
        size = resolve_group_size("quantize.hqq", config.group_size, in_features_of(refs))
    params, bits = config.params(), config.bits
    quantize_refs(
        refs, lambda w, mask: hqq_quantize(w, bits, size, params, mask), run.ctx, "quantize.hqq"
    )
    log.info("quantize.hqq: %d weights to %d bits (group %s)", len(refs), bits, size)
    return size


def _hqq_blockwise(config: HQQConfig, run: Run) -> DataFree:
    """Offloaded compression: each block as it streams by, then the layers outside the blocks."""
    return part_by_part(config, lambda part, each: hqq_selected(part, each, run))


@register_method(
    "quantize.hqq",
    HQQConfig,
    "calibration-free HQQ int1..int8 weights: per-group zero points by half-quadratic lp-error"
    " optimisation",
    layerwise=_hqq_blockwise,
)
def hqq(model: nn.Module, config: HQQConfig, run: Run) -> None:
    hqq_selected(model, config, run)
