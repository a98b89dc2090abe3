"""Recipe stages ``quantize.awq`` and ``quantize.smoothquant``: per-channel scales folded between
a layer and the Linear layers that read its output (groups found by
:func:`slimtorch.quantize.scaling.scale_groups`), block by block.

AWQ (Lin et al., 2024): per group, search the activation-aware scales, fold them, clip the
weights (not the query/key maps), then round to nearest on the group grid (packed int4 with
group scales and zero points in the artifact). SmoothQuant (Xiao et al., 2023): fold
``s = max|x|^a / max|W|^(1-a)`` from norms into the Linear layers that follow, so that int8
activations lose less; ``quantize.dynamic_int8`` (per-token int8 activations, int8 weights)
then runs them (preset ``w8a8-smoothquant``).
"""

from __future__ import annotations

import logging
import re
from typing import Any, Literal

from pydantic import Field, model_validator
from torch import nn

from slimtorch.calibrate.sequential import (
    Accumulator,
    LayerwiseConfig,
    block_linears,
    run_layerwise,
)
from slimtorch.calibrate.statistics import FirstRowsAccumulator
from slimtorch.core.errors import UnsupportedModelError
from slimtorch.core.methods import Run, register_method
from slimtorch.formats.state import WeightState, apply_state
from slimtorch.quantize.affine import quantize_weight
from slimtorch.quantize.awq import apply_awq_clip, apply_awq_scales, awq_clip, awq_search_scales
from slimtorch.quantize.groups import AUTO_RULE, GroupSize, fix_group_size
from slimtorch.quantize.primitives import QuantSpec
from slimtorch.quantize.scaling import _Producers, scale_groups
from slimtorch.quantize.smoothquant import channel_absmax, smooth_scales
from slimtorch.quantize.smoothquant import weight_absmax as weights_absmax

log = logging.getLogger(__name__)

_QK = re.compile(r"(^|\.)(q|k|q_proj|k_proj|query|key|q_lin|k_lin)$")


class _ScalingCompressor:
    def __init__(self, config: Any, limit: int) -> None:
        self.config = config
        self.limit = limit
        self.layers: dict[str, nn.Linear] = {}
        self.producers: _Producers | None = None

    def observe(self, name: str, block: nn.Module) -> dict[str, Accumulator]:
        self.layers = block_linears(block, name, self.config)
        self.producers = _Producers(block, set(self.layers))
        return {n: FirstRowsAccumulator(self.limit) for n in self.layers}

    def compress(self, name: str, block: nn.Module, stats: dict[str, Accumulator]) -> None:
        assert self.producers is not None
        self.producers.remove()
        rows = {n: s for n, s in stats.items() if isinstance(s, FirstRowsAccumulator)}
        layers: dict[str, nn.Module] = dict(self.layers)
        groups = scale_groups(block, layers, self.producers)
        self.producers = None
        self.apply(name, block, groups, rows)

    def skip(self, name: str, block: nn.Module, stats: dict[str, Accumulator]) -> None:
        """A distributed run's other ranks: another rank compresses this block (and sends it);
        drop the hooks ``observe`` set here."""
        if self.producers is not None:
            self.producers.remove()
            self.producers = None

    def apply(
        self, name: str, block: nn.Module, groups: Any, rows: dict[str, FirstRowsAccumulator]
    ) -> None:
        raise NotImplementedError


class AWQConfig(LayerwiseConfig):
    """AWQ: activation-aware scales and clipping, then round-to-nearest on the group grid."""

    bits: int = Field(4, ge=2, le=8)
    group_size: GroupSize = Field(128, description=AUTO_RULE)
    grid: int = Field(20, ge=2, description="scale exponents tried in [0, 1)")
    clip: bool = True
    max_tokens: int = Field(4096, ge=64, description="calibration rows kept per layer")

    @model_validator(mode="after")
    def _group(self) -> AWQConfig:
        if isinstance(self.group_size, int) and self.group_size < 8:
            raise ValueError(f"group_size={self.group_size}; use 8 or more, or 'auto'")
        return self

    def spec(self) -> QuantSpec:
        """The grid (after :func:`fix_group_size` has replaced ``auto``)."""
        assert self.group_size != "auto", "resolve group_size: auto first"
        return QuantSpec(
            bits=self.bits, signed=False, symmetric=False, granularity="per_group",
            group_size=int(self.group_size), observer="minmax",
        )  # fmt: skip


class AWQCompressor(_ScalingCompressor):
    first = True

    def observe(self, name: str, block: nn.Module) -> dict[str, Accumulator]:
        stats = super().observe(name, block)
        layers = {n: (m, "weight") for n, m in self.layers.items()}
        self.config = fix_group_size(self.config, "quantize.awq", layers, self.first)
        self.first = False
        return stats

    def apply(
        self, name: str, block: nn.Module, groups: Any, rows: dict[str, FirstRowsAccumulator]
    ) -> None:
        spec = self.config.spec()
        unseen = [n for n, r in rows.items() if not r.count]
        if unseen:
            raise UnsupportedModelError(
                f"quantize.awq: {', '.join(unseen)} in {name or 'the model'} received no inputs"
                " while the block ran (a MultiheadAttention reads its out_proj weight directly),"
                " so no scales can be searched; add them to `ignore`"
            )
        x = {n: r.matrix() for n, r in rows.items()}
        for prev, names in groups:
            weights = [self.layers[n].weight.detach() for n in names]
            s = awq_search_scales(weights, x[names[0]], spec, grid=self.config.grid)
            apply_awq_scales(block.get_submodule(prev), [self.layers[n] for n in names], s)
            for n in names:
                x[n] = x[n] / s
        for lname, layer in self.layers.items():
            w = layer.weight.detach()
            if self.config.clip and not _QK.search(lname):
                w = apply_awq_clip(w, awq_clip(w, x[lname], spec), spec)
            apply_state(layer, "weight", WeightState(quant=quantize_weight(w, spec)))
        log.debug("awq %s: %d scale groups", name, len(groups))


class SmoothQuantConfig(LayerwiseConfig):
    """SmoothQuant: migrate activation outliers into the weights (alpha); run int8 after."""

    alpha: float = Field(0.5, ge=0, le=1)
    producers: Literal["norms", "all"] = Field(
        "norms", description="fold only from normalisation layers (the paper), or also Linears"
    )


class SmoothQuantCompressor(_ScalingCompressor):
    def apply(
        self, name: str, block: nn.Module, groups: Any, rows: dict[str, FirstRowsAccumulator]
    ) -> None:
        for prev, names in groups:
            prev_mod = block.get_submodule(prev)
            if self.config.producers == "norms" and isinstance(prev_mod, nn.Linear):
                continue
            linears = [self.layers[n] for n in names]
            s = smooth_scales(
                channel_absmax(rows[names[0]].matrix()),
                weights_absmax([m.weight.detach() for m in linears]),
                self.config.alpha,
            )
            apply_awq_scales(prev_mod, linears, s)


@register_method(
    "quantize.awq",
    AWQConfig,
    "AWQ: activation-aware scaling and clipping, then group-wise int4 weights",
    needs_data=True,
    layerwise=lambda config, run: AWQCompressor(config, config.max_tokens),
)
def awq(model: nn.Module, config: AWQConfig, run: Run) -> None:
    run_layerwise(model, AWQCompressor(config, config.max_tokens), run, config, "quantize.awq")


@register_method(
    "quantize.smoothquant",
    SmoothQuantConfig,
    "SmoothQuant: fold activation outliers into weights (then quantize.dynamic_int8: W8A8)",
    needs_data=True,
    layerwise=lambda config, run: SmoothQuantCompressor(config, 4096),
)
def smoothquant(model: nn.Module, config: SmoothQuantConfig, run: Run) -> None:
    compressor = SmoothQuantCompressor(config, 4096)
    run_layerwise(model, compressor, run, config, "quantize.smoothquant")
