"""Recipe stage ``quantize.gptq``: GPTQ on every targeted Linear, block by block.

Each block's Linear layers get the Hessian ``2/n X^T X`` of their inputs (from the sequential
pipeline: the inputs the already-quantized earlier blocks produce), then
:func:`slimtorch.quantize.gptq.gptq_quantize` quantizes them; masks from earlier pruning stages
are kept (pruned weights stay exactly zero). The grid is the one ``quantize.rtn`` uses, so the
artifact stores packed codes, group scales and zero points the same way.
"""

from __future__ import annotations

import logging
from typing import Literal

from pydantic import Field, model_validator
from torch import nn

from slimtorch.calibrate.per_layer import PerLayerCompressor
from slimtorch.calibrate.sequential import (
    Accumulator,
    LayerwiseConfig,
    block_matrices,
    matrix_weight,
    run_layerwise,
)
from slimtorch.calibrate.statistics import HessianAccumulator
from slimtorch.core.methods import Run, register_method
from slimtorch.formats.state import WeightState, apply_state, get_state, to_matrix
from slimtorch.quantize.gptq import gptq_quantize
from slimtorch.quantize.groups import AUTO_RULE, GroupSize, fix_group_size, resolved_spec
from slimtorch.quantize.primitives import QuantSpec

log = logging.getLogger(__name__)


class GPTQConfig(LayerwiseConfig):
    """GPTQ (Frantar et al., 2023): weights quantized column by column, each column's rounding
    error spread over the columns not yet quantized, weighted by the inverse Hessian."""

    bits: int = Field(4, ge=2, le=8)
    symmetric: bool = False
    granularity: Literal["per_channel", "per_group"] = "per_group"
    group_size: GroupSize = Field(128, description=AUTO_RULE)
    observer: Literal["minmax", "mse"] = "minmax"
    full_range: bool = Field(
        False,
        description="symmetric grids: use all 2**bits codes (llama.cpp's Q4_0 grid: the scale's"
        " sign puts each group's largest-magnitude weight on the extra negative code)",
    )
    damp: float = Field(0.01, gt=0, le=1, description="fraction of mean diag(H) added")
    block_size: int = Field(128, ge=1, description="lazy-update block of columns")
    act_order: bool = Field(False, description="quantize columns by decreasing diag(H)")
    static_groups: bool = Field(True, description="group grids fixed before act_order runs")

    @model_validator(mode="after")
    def _storable(self) -> GPTQConfig:
        if isinstance(self.group_size, int) and self.group_size < 8:
            raise ValueError(f"group_size={self.group_size}; use 8 or more, or 'auto'")
        if self.full_range and not self.symmetric:
            raise ValueError("full_range needs symmetric: true (asymmetric grids use every code)")
        if self.act_order and self.granularity == "per_group" and not self.static_groups:
            raise ValueError(
                "act_order with per-group grids needs static_groups: true (otherwise a group's"
                " columns are scattered and the artifact cannot store it)"
            )
        return self

    def spec(self) -> QuantSpec:
        """The grid (after :func:`fix_group_size` has replaced ``auto``)."""
        return resolved_spec(self, observer=self.observer, full_range=self.full_range)


class GPTQCompressor(PerLayerCompressor):
    stage, fallback = "quantize.gptq", "RTN"
    config: GPTQConfig

    def __init__(self, config: GPTQConfig, run: Run | None = None) -> None:
        super().__init__(config, run.data_free if run is not None else None)
        self.first = True

    def accumulator(self, columns: int) -> Accumulator:
        return HessianAccumulator(columns)

    def select(self, name: str, block: nn.Module) -> dict[str, tuple[nn.Module, str]]:
        layers = block_matrices(block, name, self.config)
        self.config = fix_group_size(self.config, "quantize.gptq", layers, self.first)
        self.first = False
        return layers

    def compress_layer(
        self, block_name: str, key: str, layer: nn.Module, param: str, acc: Accumulator
    ) -> None:
        c = self.config
        assert isinstance(acc, HessianAccumulator)
        weight = matrix_weight(layer, param)
        old = get_state(layer, param)
        mask = old.mask if old is not None else None
        result = gptq_quantize(
            to_matrix(weight.detach()),
            acc.hessian(),
            c.spec(),
            damp=c.damp,
            block_size=c.block_size,
            act_order=c.act_order,
            static_groups=c.static_groups,
            mask=None if mask is None else to_matrix(mask),
        )
        state = WeightState(mask=mask, quant=result.quant_state(tuple(weight.shape)))
        apply_state(layer, param, state)
        log.debug("gptq %s.%s: loss %.4g", block_name, key, result.loss)


def _compressor(config: GPTQConfig, run: Run) -> GPTQCompressor:
    return GPTQCompressor(config, run)


@register_method(
    "quantize.gptq",
    GPTQConfig,
    "GPTQ: Hessian-aware weight quantization, block by block on calibration data",
    needs_data=True,
    layerwise=_compressor,
)
def gptq(model: nn.Module, config: GPTQConfig, run: Run) -> None:
    blocks = run_layerwise(model, GPTQCompressor(config, run), run, config, "quantize.gptq")
    log.info("quantize.gptq: %d blocks to %d bits", len(blocks), config.bits)
