"""Recipe stages ``quantize.awq`` and ``quantize.smoothquant``: per-channel scales folded between
a layer and the Linear layers that read its output (groups found by
:func:`slimtorch.quantize.scaling.scale_groups`), block by block.

AWQ (Lin et al., 2024): per group, search the activation-aware scales, fold them, clip the
weights (not the query/key maps), then round to nearest on the group grid (packed int4 with
group scales and zero points in the artifact). Mixture-of-experts layers get AutoAWQ's groups
(:func:`slimtorch.quantize.scaling.expert_groups`): one scale for the norm before every
expert's ``gate_proj``/``up_proj`` (the router's weight takes the same scale, unquantized, so
the routing is unchanged), searched on all tokens, and one per expert for ``up_proj ->
down_proj`` on its routed rows; an expert no calibration token reached has its ``down_proj``
rounded to nearest (listed in the run's note, ``data_free``). SmoothQuant (Xiao et al., 2023): fold
``s = max|x|^a / max|W|^(1-a)`` from norms into the Linear layers that follow, so that int8
activations lose less; ``quantize.dynamic_int8`` (per-token int8 activations, int8 weights)
then runs them (preset ``w8a8-smoothquant``).
"""

from __future__ import annotations

import logging
import re
from typing import Any, Literal

from pydantic import Field, model_validator
from torch import Tensor, nn

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
from slimtorch.quantize.scaling import ExpertGroup, _Producers, expert_groups, scale_groups
from slimtorch.quantize.smoothquant import channel_absmax, smooth_scales
from slimtorch.quantize.smoothquant import weight_absmax as weights_absmax
from slimtorch.runtime.moe import ExpertMLP, UnfusedExperts

log = logging.getLogger(__name__)

_QK = re.compile(r"(^|\.)(q|k|q_proj|k_proj|query|key|q_lin|k_lin)$")


def _in_expert(block: nn.Module, name: str) -> bool:
    return isinstance(block.get_submodule(name.rpartition(".")[0]), ExpertMLP)


class _ScalingCompressor:
    def __init__(self, config: Any, limit: int, data_free: list[str] | None = None) -> None:
        self.config = config
        self.limit = limit
        self.layers: dict[str, nn.Linear] = {}
        self.producers: _Producers | None = None
        self.data_free = [] if data_free is None else data_free  # the run's note

    def observe(self, name: str, block: nn.Module) -> dict[str, Accumulator]:
        self.layers = block_linears(block, name, self.config)
        self.producers = _Producers(block, set(self.layers))
        experts = [n for n, m in block.named_modules() if isinstance(m, UnfusedExperts)]
        return {n: FirstRowsAccumulator(self.limit) for n in [*self.layers, *experts]}

    def compress(self, name: str, block: nn.Module, stats: dict[str, Accumulator]) -> None:
        assert self.producers is not None
        self.producers.remove()
        rows = {n: s for n, s in stats.items() if isinstance(s, FirstRowsAccumulator)}
        layers: dict[str, nn.Module] = dict(self.layers)
        groups = scale_groups(block, layers, self.producers)
        moe = expert_groups(block, layers, self.producers)
        self.producers = None
        self.note_starved(name, block, rows)
        self.apply(name, block, groups, moe, rows)

    def skip(self, name: str, block: nn.Module, stats: dict[str, Accumulator]) -> None:
        """A distributed run's other ranks: another rank compresses this block (and sends it);
        drop the hooks ``observe`` set here (and note the same starved experts: the
        statistics are combined over the ranks already)."""
        if self.producers is not None:
            self.producers.remove()
            self.producers = None
        rows = {n: s for n, s in stats.items() if isinstance(s, FirstRowsAccumulator)}
        self.note_starved(name, block, rows)

    def note_starved(
        self, name: str, block: nn.Module, rows: dict[str, FirstRowsAccumulator]
    ) -> None:
        """Add the layers this stage compresses without data to the run's note."""

    def apply(
        self,
        name: str,
        block: nn.Module,
        groups: list[tuple[str, list[str]]],
        moe: list[ExpertGroup],
        rows: dict[str, FirstRowsAccumulator],
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

    def note_starved(
        self, name: str, block: nn.Module, rows: dict[str, FirstRowsAccumulator]
    ) -> None:
        """The experts' ``down_proj`` no calibration token reached: rounded to nearest (their
        ``gate_proj``/``up_proj`` are scaled and clipped on all the tokens of the layer)."""
        none = [
            f"{name}.{n}" if name else n
            for n in self.layers
            if n.endswith(".down_proj") and _in_expert(block, n) and not rows[n].count
        ]
        if none:
            log.warning("quantize.awq: no calibration token reached %s: RTN instead", none)
            self.data_free.extend(none)

    def observe(self, name: str, block: nn.Module) -> dict[str, Accumulator]:
        stats = super().observe(name, block)
        layers = {n: (m, "weight") for n, m in self.layers.items()}
        self.config = fix_group_size(self.config, "quantize.awq", layers, self.first)
        self.first = False
        return stats

    def apply(
        self,
        name: str,
        block: nn.Module,
        groups: list[tuple[str, list[str]]],
        moe: list[ExpertGroup],
        rows: dict[str, FirstRowsAccumulator],
    ) -> None:
        spec = self.config.spec()
        unseen = [n for n, r in rows.items() if not r.count and not _in_expert(block, n)]
        if unseen:
            raise UnsupportedModelError(
                f"quantize.awq: {', '.join(unseen)} in {name or 'the model'} received no inputs"
                " while the block ran (a MultiheadAttention reads its out_proj weight directly),"
                " so no scales can be searched; add them to `ignore`"
            )
        held: dict[int, Tensor] = {}  # layers sharing an accumulator share one matrix
        x: dict[str, Tensor] = {}  # a starved expert's layers: none
        for n, r in rows.items():
            if r.count:
                x[n] = held[id(r)] if id(r) in held else held.setdefault(id(r), r.matrix())
        shared: dict[str, str] = {}  # an expert's gate/up -> the experts module (all tokens)
        for g in _all_groups(groups, moe):
            if g.source not in x:
                continue  # a starved expert's down_proj: rounded to nearest below
            weights = [self.layers[n].weight.detach() for n in g.names]
            routed = None  # the experts' norm group: each expert's error on its routed rows
            if isinstance(block.get_submodule(g.source), UnfusedExperts):
                routed = [x.get(n, x[g.source][:0]) for n in g.names]
                shared.update({n: g.source for n in g.names})
            s = awq_search_scales(weights, x[g.source], spec, grid=self.config.grid, rows=routed)
            mods = [self.layers[n] for n in g.names] + [block.get_submodule(r) for r in g.riders]
            apply_awq_scales(block.get_submodule(g.prev), mods, s)
            for n in {*g.names, g.source}:
                if n in x:
                    x[n] = x[n] / s
        for lname, layer in self.layers.items():
            w = layer.weight.detach()
            seen = x.get(lname, x.get(shared.get(lname, "")))  # routed rows, else all tokens
            if seen is None and not lname.endswith(".down_proj"):  # no norm group was found
                self.data_free.append(f"{name}.{lname}" if name else lname)
            elif self.config.clip and not _QK.search(lname) and seen is not None:
                w = apply_awq_clip(w, awq_clip(w, seen, spec), spec)
            apply_state(layer, "weight", WeightState(quant=quantize_weight(w, spec)))
        log.debug("awq %s: %d scale groups", name, len(groups) + len(moe))


class SmoothQuantConfig(LayerwiseConfig):
    """SmoothQuant: migrate activation outliers into the weights (alpha); run int8 after."""

    alpha: float = Field(0.5, ge=0, le=1)
    producers: Literal["norms", "all"] = Field(
        "norms", description="fold only from normalisation layers (the paper), or also Linears"
    )


def _all_groups(groups: list[tuple[str, list[str]]], moe: list[ExpertGroup]) -> list[ExpertGroup]:
    """The generic groups (their input: the first Linear's), then the experts' groups."""
    return [ExpertGroup(prev, names, [], names[0]) for prev, names in groups] + moe


class SmoothQuantCompressor(_ScalingCompressor):
    def apply(
        self,
        name: str,
        block: nn.Module,
        groups: list[tuple[str, list[str]]],
        moe: list[ExpertGroup],
        rows: dict[str, FirstRowsAccumulator],
    ) -> None:
        for g in _all_groups(groups, moe):
            prev_mod = block.get_submodule(g.prev)
            if self.config.producers == "norms" and isinstance(prev_mod, nn.Linear):
                continue
            if not rows[g.source].count:
                continue  # an expert no calibration token reached
            linears = [self.layers[n] for n in g.names]
            s = smooth_scales(
                channel_absmax(rows[g.source].matrix()),
                weights_absmax([m.weight.detach() for m in linears]),
                self.config.alpha,
            )
            apply_awq_scales(prev_mod, linears + [block.get_submodule(r) for r in g.riders], s)


@register_method(
    "quantize.awq",
    AWQConfig,
    "AWQ: activation-aware scaling and clipping, then group-wise int4 weights",
    needs_data=True,
    layerwise=lambda config, run: AWQCompressor(config, config.max_tokens, run.data_free),
)
def awq(model: nn.Module, config: AWQConfig, run: Run) -> None:
    compressor = AWQCompressor(config, config.max_tokens, run.data_free)
    run_layerwise(model, compressor, run, config, "quantize.awq")


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
