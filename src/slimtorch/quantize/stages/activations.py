"""``quantize.activations``: simulated per-token dynamic activation quantization (W4A8, W4A4).

Each selected Linear is wrapped in an :class:`~slimtorch.runtime.act_quant.ActQuantLinear`
that rounds every input token to its own ``bits``-bit grid before the product (the arithmetic
of an integer kernel with per-token scales, run in floating point). Weights are left to the
stages that quantize them (``quantize.gptq`` / ``quantize.rtn``, before or after this stage:
the wrapped Linear keeps its name plus ``.linear``). The real int8 x int8 path with a CPU
speed-up is ``quantize.dynamic_int8``; this stage exists to measure quality at 4 to 8 bits,
for which ``quantize.rotate`` first is what makes 4-bit activations usable.

Offloaded (``slimtorch compress --max-memory``): :func:`wrap_activations` wraps each block's
Linear layers as the block streams by and those outside the blocks at the end
(:class:`~slimtorch.calibrate.swaps.SwapParts`), the same layers as in memory: the artifact is
the in-memory one. :func:`wrap_activations` on the ``meta`` model gives the manifest's records.
"""

from __future__ import annotations

import logging

from pydantic import Field
from torch import nn

from slimtorch.calibrate.swaps import SwapParts
from slimtorch.core.config import StageConfig
from slimtorch.core.errors import TargetError, UnsupportedModelError
from slimtorch.core.methods import Run, register_method
from slimtorch.graph.weights import replace_module
from slimtorch.quantize.stages.dynamic import select_linears
from slimtorch.runtime.act_quant import ActQuantLinear

log = logging.getLogger(__name__)


class ActivationsConfig(StageConfig):
    """Per-token dynamic fake quantization of the inputs of the selected Linear layers."""

    bits: int = Field(8, ge=2, le=8, description="bits per activation (2..8)")
    symmetric: bool = Field(
        True, description="symmetric codes around 0, or asymmetric [min, max] with a zero point"
    )
    clip: float = Field(
        1.0, gt=0, le=1, description="scale each token's range by this ratio before rounding"
    )


def wrap_activations(model: nn.Module, config: ActivationsConfig, missing: str = "error") -> int:
    """Wrap every selected Linear of ``model`` (not yet wrapped) in an ActQuantLinear; returns
    how many. With ``missing="skip"`` a model whose layers the targets do not match is left as
    it is (one part of an offloaded run). Works on ``meta`` layers too (no arithmetic)."""
    try:
        selected = select_linears(model, config)
    except TargetError:
        if missing == "error":
            raise
        return 0
    names = dict(model.named_modules())
    refs = [r for r in selected
            if not isinstance(names.get(r.module_name.rpartition(".")[0]), ActQuantLinear)]  # fmt: skip
    if any(ref.module_name == "" for ref in refs):
        raise UnsupportedModelError(
            "the model itself is a Linear and cannot be wrapped in place; wrap it, e.g."
            " nn.Sequential(model)"
        )
    for ref in refs:
        linear = ref.module
        wrapper = ActQuantLinear(linear, config.bits, config.symmetric, config.clip)
        replace_module(model, ref.module_name, wrapper.train(linear.training))
    return len(refs)


def _blockwise(config: ActivationsConfig, run: Run) -> SwapParts:
    """Offloaded runs: each block, then the layers outside the blocks (module docstring)."""

    def one(part: nn.Module) -> None:
        wrap_activations(part, config, "skip")

    return SwapParts(one)


@register_method(
    "quantize.activations",
    ActivationsConfig,
    "simulated per-token dynamic int2..int8 activations on Linear inputs (W4A8 / W4A4 quality)",
    layerwise=_blockwise,
)
def activations(model: nn.Module, config: ActivationsConfig, run: Run) -> None:
    count = wrap_activations(model, config)
    log.info(
        "quantize.activations: %d Linear inputs to %d bits per token (%s, clip %.2f)",
        count, config.bits, "symmetric" if config.symmetric else "asymmetric", config.clip,
    )  # fmt: skip
