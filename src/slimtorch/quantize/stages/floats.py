"""Float-format weight stages: ``quantize.fp8``, ``quantize.mxfp4``, ``quantize.nvfp4``.

Calibration-free. The weights keep their layers and carry a ``float`` quantization state
(:mod:`slimtorch.quantize.floats`: FP8 E4M3 per output channel, MXFP4 blocks of 32 with E8M0
scales, NVFP4 blocks of 16 with E4M3 scales and a float32 tensor scale); the artifact stores
the bit codes (FP4 two per byte) and one byte per block scale. ``quantize.fp8`` with
``activations: dynamic`` swaps each Linear for :class:`~slimtorch.runtime.Fp8Linear` (W8A8:
activations in E4M3 per token at run time; ``torch._scaled_mm`` on Ada/Hopper GPUs, simulated
exactly elsewhere).

All three also run offloaded (``slimtorch compress --max-memory``): each block as it streams
by, then the layers outside the blocks (:func:`_blockwise`); ``quantize.fp8 activations:
dynamic`` there swaps each block's Linear layers (under their full names,
:class:`~slimtorch.calibrate.swaps.SwapParts`) and the manifest records the Fp8Linear modules
from :func:`fp8_dynamic` run on the ``meta`` model up front: the artifact is the in-memory one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from slimtorch.calibrate.sequential import DataFree
from slimtorch.calibrate.swaps import SwapParts
from slimtorch.core.config import StageConfig
from slimtorch.core.errors import TargetError, UnsupportedModelError
from slimtorch.core.methods import Run, register_method
from slimtorch.formats.state import QuantState, clear_state, get_state
from slimtorch.graph.weights import WeightRef, replace_module, select_weights
from slimtorch.quantize import floats
from slimtorch.quantize.stages.rtn import part_by_part, quantize_refs
from slimtorch.runtime import Fp8Linear

log = logging.getLogger(__name__)

Quantizer = Callable[[torch.Tensor, torch.Tensor | None], QuantState]


class FloatConfig(StageConfig):
    """Float-format weights of every selected weight (Linear layers by default)."""

    targets: list[str] | None = Field(
        default_factory=lambda: ["Linear"],
        description="layers to quantize (default: every Linear)",
    )
    missing: Literal["error", "skip"] = Field(
        "error", description="when the targets match no layer: 'error', or 'skip' the stage"
    )


class Fp8Config(FloatConfig):
    """FP8 E4M3 weights, one float32 scale per output channel."""

    activations: Literal["none", "dynamic"] = Field(
        "none",
        description="'none': weight-only (W8A16); 'dynamic': Linear layers become Fp8Linear"
        " with activations quantized to E4M3 per token at run time (W8A8)",
    )


def _refs(model: nn.Module, config: FloatConfig, stage: str) -> list[WeightRef]:
    try:
        return select_weights(model, config.targets, config.ignore)
    except TargetError:
        if config.missing == "error":
            raise
        log.info("%s: targets %s match no layer here; skipped", stage, config.targets)
        return []


def _quantize(model: nn.Module, config: FloatConfig, run: Run, stage: str, fn: Quantizer) -> int:
    refs = _refs(model, config, stage)
    quantize_refs(refs, fn, run.ctx, stage)
    log.info("%s: %d weights", stage, len(refs))
    return len(refs)


def _blockwise(stage: str, fn: Quantizer) -> Callable[[FloatConfig, Run], DataFree]:
    """The layer-wise compressor of a float stage (offloaded runs, ``--max-memory``): quantize
    each block as it streams by, then the layers outside the blocks (the offloaded run calls it
    on the model without its blocks: an untied LM head, or a tied embedding and LM head once).
    A part with no target is skipped; ``missing: error`` is checked against the whole model up
    front by the offloaded run. Every weight is quantized on its own (per row, per block of
    inputs, NVFP4's per-tensor scale), so the result is the in-memory one, bit for bit."""

    def build(config: FloatConfig, run: Run) -> DataFree:
        if isinstance(config, Fp8Config) and config.activations == "dynamic":
            dynamic = config

            def swap(part: nn.Module) -> None:
                fp8_dynamic(part, dynamic, "skip")

            return SwapParts(swap)

        def apply(part: nn.Module, each: FloatConfig) -> None:
            _quantize(part, each, run, stage, fn)

        return part_by_part(config, apply)

    return build


def fp8_dynamic(model: nn.Module, config: Fp8Config, missing: str | None = None) -> int:
    """Replace the selected Linear layers by dynamic W8A8 :class:`Fp8Linear` modules; returns
    how many. ``missing`` overrides the config's (``"skip"``: one part of an offloaded run). On
    ``meta`` layers the new modules are empty ``meta`` ones (the structure alone: the offloaded
    run's manifest records)."""
    each = config.model_copy(update={"missing": missing}) if missing else config
    refs = _refs(model, each, "quantize.fp8")
    if not refs:
        return 0
    linears = [r for r in refs if isinstance(r.module, nn.Linear) and r.param == "weight"]
    others = sorted({r.kind for r in refs} - {"Linear"})
    if others or not linears:
        raise TargetError(
            f"quantize.fp8 activations: dynamic applies to Linear layers only, the targets also"
            f" match {', '.join(others) or 'nothing else'}; target Linear layers, or use"
            " activations: none"
        )
    if any(r.module_name == "" for r in linears):
        raise UnsupportedModelError(
            "the model itself is a Linear and cannot be replaced in place; wrap it, e.g."
            " nn.Sequential(model)"
        )
    for ref in linears:
        linear = ref.module
        assert isinstance(linear, nn.Linear)
        if linear.weight.device.type == "meta":
            with torch.device("meta"):
                new = Fp8Linear(linear.in_features, linear.out_features,
                                linear.bias is not None, "dynamic")  # fmt: skip
            replace_module(model, ref.module_name, new.train(linear.training))
            continue
        state = get_state(linear, "weight")
        mask = state.mask if state is not None else None
        q = floats.fp8_per_channel(linear.weight.detach(), mask)
        new = Fp8Linear(linear.in_features, linear.out_features, linear.bias is not None, "dynamic")
        new.weight_fp8.copy_(q.codes.reshape(new.weight_fp8.shape))
        new.weight_scale.copy_(q.scale.reshape(-1))
        if linear.bias is not None and new.bias is not None:
            new.bias.copy_(linear.bias.detach().to(torch.float32))
        clear_state(linear, "weight")
        device = linear.weight.device
        replace_module(model, ref.module_name, new.to(device).train(linear.training))
    return len(linears)


@register_method(
    "quantize.fp8",
    Fp8Config,
    "FP8 E4M3 weights per output channel, optional dynamic per-token FP8 activations",
    layerwise=_blockwise("quantize.fp8", floats.fp8_per_channel),
)
def fp8(model: nn.Module, config: Fp8Config, run: Run) -> None:
    if config.activations == "dynamic":
        count = fp8_dynamic(model, config)
        if count:
            log.info("quantize.fp8: %d Linear layers to W8A8 Fp8Linear", count)
        return
    _quantize(model, config, run, "quantize.fp8", floats.fp8_per_channel)


@register_method(
    "quantize.mxfp4",
    FloatConfig,
    "MXFP4 weights: FP4 E2M1 in blocks of 32 with a shared E8M0 scale (OCP MX, 4.25 bits)",
    layerwise=_blockwise("quantize.mxfp4", floats.mxfp4),
)
def mxfp4(model: nn.Module, config: FloatConfig, run: Run) -> None:
    _quantize(model, config, run, "quantize.mxfp4", floats.mxfp4)


@register_method(
    "quantize.nvfp4",
    FloatConfig,
    "NVFP4 weights: FP4 E2M1 in blocks of 16, E4M3 block scales, fp32 tensor scale (4.5 bits)",
    layerwise=_blockwise("quantize.nvfp4", floats.nvfp4),
)
def nvfp4(model: nn.Module, config: FloatConfig, run: Run) -> None:
    _quantize(model, config, run, "quantize.nvfp4", floats.nvfp4)
