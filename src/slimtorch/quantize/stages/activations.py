"""``quantize.activations``: simulated per-token dynamic activation quantization (W4A8, W4A4).

Each selected Linear is wrapped in an :class:`~slimtorch.runtime.act_quant.ActQuantLinear`
that rounds every input token to its own ``bits``-bit grid before the product (the arithmetic
of an integer kernel with per-token scales, run in floating point). Weights are left to the
stages that quantize them (``quantize.gptq`` / ``quantize.rtn``, before or after this stage:
the wrapped Linear keeps its name plus ``.linear``). The real int8 x int8 path with a CPU
speed-up is ``quantize.dynamic_int8``; this stage exists to measure quality at 4 to 8 bits,
for which ``quantize.rotate`` first is what makes 4-bit activations usable.
"""

from __future__ import annotations

import logging

from pydantic import Field
from torch import nn

from slimtorch.core.config import StageConfig
from slimtorch.core.errors import UnsupportedModelError
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


@register_method(
    "quantize.activations",
    ActivationsConfig,
    "simulated per-token dynamic int2..int8 activations on Linear inputs (W4A8 / W4A4 quality)",
)
def activations(model: nn.Module, config: ActivationsConfig, run: Run) -> None:
    names = dict(model.named_modules())
    refs = [r for r in select_linears(model, config)
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
    log.info(
        "quantize.activations: %d Linear inputs to %d bits per token (%s, clip %.2f)",
        len(refs), config.bits, "symmetric" if config.symmetric else "asymmetric", config.clip,
    )  # fmt: skip
