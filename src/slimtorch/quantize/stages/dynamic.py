"""``quantize.dynamic_int8``: swap Linear layers for :class:`~slimtorch.runtime.Int8DynamicLinear`
and LSTM / GRU layers for :class:`~slimtorch.runtime.Int8DynamicLSTM` / ``Int8DynamicGRU``.

Weights become int8 per output channel; activations are quantized per token at run time, and the
product runs as a real int8 matrix multiply. A Linear that is a MultiheadAttention's ``out_proj``
is left alone: MultiheadAttention reads ``out_proj.weight`` directly. An LSTM with
``proj_size > 0`` is left alone too (logged): the int8 LSTM has no projection.
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
from slimtorch.runtime import Int8DynamicGRU, Int8DynamicLinear, Int8DynamicLSTM

log = logging.getLogger(__name__)


class DynamicInt8Config(StageConfig):
    """Dynamic int8 Linear layers (per-channel int8 weights, per-token int8 activations)."""

    embeddings: bool = Field(
        default=True,
        description="also store every Embedding (not in `ignore`) as int8 per row, weight-only,"
        " so the artifact shrinks where a model's size is in its embeddings",
    )
    rnns: bool = Field(
        default=False,
        description="also run every LSTM/GRU (not in `ignore`) with int8 weights and int8"
        " input-hidden and hidden-hidden products (Int8DynamicLSTM/GRU): about 2.5x smaller"
        " on char-lstm, but slower than float32 at batch 1 on CPU (per-step overhead)",
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


def select_linears(
    model: nn.Module, config: StageConfig, types: tuple[str, ...] = ("Linear",)
) -> list[WeightRef]:
    """The weights of ``types`` (Linear, LSTM, GRU) to replace, MultiheadAttention out_projs
    left out; a clear error when the targets name only other layers."""
    try:
        refs = select_weights(model, config.targets, config.ignore, types=types)
    except TargetError:
        other = select_weights(model, config.targets, config.ignore)  # raises if nothing matches
        kinds = sorted({ref.kind for ref in other})
        names = "Linear layers" + "".join(f", {t}" for t in types if t != "Linear")
        raise TargetError(
            f"quantize.dynamic_int8 applies to {names} only, but targets {config.targets}"
            f" matched {', '.join(kinds)}; target {names}, or use quantize.rtn for the others"
        ) from None
    skip = _attention_out_projs(model)
    classes = tuple(getattr(nn, t) for t in types)
    return [r for r in refs if r.module_name not in skip and isinstance(r.module, classes)]


def _swap_rnns(model: nn.Module, refs: list[WeightRef]) -> int:
    """Replace each selected LSTM / GRU (once, whatever weights were selected); the count."""
    rnns = {r.module_name: r.module for r in refs if isinstance(r.module, (nn.LSTM, nn.GRU))}
    done = 0
    for name, rnn in rnns.items():
        assert isinstance(rnn, nn.LSTM | nn.GRU)
        if getattr(rnn, "proj_size", 0):
            log.warning("quantize.dynamic_int8: %s has proj_size > 0, left in float", name)
            continue
        masks = {}
        for param, _ in rnn.named_parameters(recurse=False):
            state = get_state(rnn, param)
            if state is not None and state.mask is not None:
                masks[param] = state.mask
            clear_state(rnn, param)
        cls = Int8DynamicLSTM if isinstance(rnn, nn.LSTM) else Int8DynamicGRU
        replace_module(model, name, cls.from_float(rnn, masks))
        done += 1
    return done


@register_method(
    "quantize.dynamic_int8",
    DynamicInt8Config,
    "int8 Linear layers with dynamic per-token activations (real int8 matmul, CPU speed-up)",
)
def dynamic_int8(model: nn.Module, config: DynamicInt8Config, run: Run) -> None:
    refs = select_linears(model, config, ("Linear", "LSTM", "GRU") if config.rnns else ("Linear",))
    if not refs:
        raise TargetError(
            "quantize.dynamic_int8 found only MultiheadAttention out_proj layers, which cannot be"
            " replaced; target other Linear layers, or use quantize.rtn"
        )
    if any(ref.module_name == "" for ref in refs):
        raise UnsupportedModelError(
            f"the model itself is a {type(model).__name__} and cannot be replaced in place; wrap"
            " it, e.g. nn.Sequential(model)"
        )
    rnns = _swap_rnns(model, refs)
    for ref in refs:
        if not isinstance(ref.module, nn.Linear):
            continue
        linear = ref.module
        assert isinstance(linear, nn.Linear)
        state = get_state(linear, "weight")
        mask = state.mask if state is not None else None
        new = Int8DynamicLinear.from_linear(linear, mask)
        clear_state(linear, "weight")
        replace_module(model, ref.module_name, new.train(linear.training))
    embedded = _quantize_embeddings(model, config.ignore) if config.embeddings else 0
    log.info(
        "quantize.dynamic_int8: replaced %d Linear, %d LSTM/GRU layers, %d embeddings to int8",
        sum(isinstance(r.module, nn.Linear) for r in refs),
        rnns,
        embedded,
    )
