"""``quantize.dynamic_int8``: swap Linear layers for :class:`~slimtorch.runtime.Int8DynamicLinear`.

Weights become int8 per output channel; activations are quantized per token at run time, and the
product runs as a real int8 matrix multiply. A Linear that is a MultiheadAttention's ``out_proj``
is left alone: MultiheadAttention reads ``out_proj.weight`` directly.
"""

from __future__ import annotations

import logging

from pydantic import Field
from torch import nn

from slimtorch.core.config import StageConfig
from slimtorch.core.errors import TargetError, UnsupportedModelError
from slimtorch.core.methods import Run, register_method
from slimtorch.formats.state import WeightState, apply_state, clear_state, get_state
from slimtorch.graph.weights import WeightRef, replace_module, select_weights
from slimtorch.quantize.affine import quantize_weight
from slimtorch.quantize.primitives import QuantSpec
from slimtorch.runtime import Int8DynamicLinear

log = logging.getLogger(__name__)


class DynamicInt8Config(StageConfig):
    """Dynamic int8 Linear layers (per-channel int8 weights, per-token int8 activations)."""

    embeddings: bool = Field(
        default=True,
        description="also store every Embedding (not in `ignore`) as int8 per row, weight-only,"
        " so the artifact shrinks where a model's size is in its embeddings",
    )


def _quantize_embeddings(model: nn.Module, ignore: list[str]) -> int:
    try:
        refs = select_weights(model, None, ignore, types=("Embedding",))
    except (TargetError, UnsupportedModelError):
        return 0  # the model has no embedding (or nothing left but the int8 Linears)
    spec = QuantSpec(bits=8, granularity="per_channel")
    for ref in refs:
        state = get_state(ref.module, ref.param)
        mask = state.mask if state is not None else None
        q = quantize_weight(ref.weight.detach(), spec, mask)
        apply_state(ref.module, ref.param, WeightState(mask=mask, quant=q))
    return len(refs)


def _attention_out_projs(model: nn.Module) -> set[str]:
    names = set()
    for name, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention):
            names.add(f"{name}.out_proj" if name else "out_proj")
    return names


def select_linears(model: nn.Module, config: StageConfig) -> list[WeightRef]:
    """The Linear weights to replace; a clear error when the targets name only other layers."""
    try:
        refs = select_weights(model, config.targets, config.ignore, types=("Linear",))
    except TargetError:
        other = select_weights(model, config.targets, config.ignore)  # raises if nothing matches
        kinds = sorted({ref.kind for ref in other})
        raise TargetError(
            f"quantize.dynamic_int8 applies to Linear layers only, but targets {config.targets}"
            f" matched {', '.join(kinds)}; target Linear layers, or use quantize.rtn for"
            " the others"
        ) from None
    skip = _attention_out_projs(model)
    return [r for r in refs if r.module_name not in skip and isinstance(r.module, nn.Linear)]


@register_method(
    "quantize.dynamic_int8",
    DynamicInt8Config,
    "int8 Linear layers with dynamic per-token activations (real int8 matmul, CPU speed-up)",
)
def dynamic_int8(model: nn.Module, config: DynamicInt8Config, run: Run) -> None:
    refs = select_linears(model, config)
    if not refs:
        raise TargetError(
            "quantize.dynamic_int8 found only MultiheadAttention out_proj layers, which cannot be"
            " replaced; target other Linear layers, or use quantize.rtn"
        )
    if any(ref.module_name == "" for ref in refs):
        raise UnsupportedModelError(
            "the model itself is a Linear and cannot be replaced in place; wrap it, e.g."
            " nn.Sequential(model)"
        )
    for ref in refs:
        linear = ref.module
        assert isinstance(linear, nn.Linear)
        state = get_state(linear, "weight")
        mask = state.mask if state is not None else None
        new = Int8DynamicLinear.from_linear(linear, mask)
        clear_state(linear, "weight")
        replace_module(model, ref.module_name, new.train(linear.training))
    embedded = _quantize_embeddings(model, config.ignore) if config.embeddings else 0
    log.info(
        "quantize.dynamic_int8: replaced %d Linear layers, %d embeddings to int8",
        len(refs),
        embedded,
    )
