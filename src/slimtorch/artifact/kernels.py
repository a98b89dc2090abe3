"""Run weight-only quantized Linear layers on torch's CPU kernels (``slimtorch.load(dir,
kernels=True)``): 2-4-bit affine group weights on the int4 kernel, 5-8-bit affine per-channel
weights (the 8-bit LM head of the w4a16 presets, the int8 preset) on the int8 kernel.

Both kernels take bfloat16 activations, so the logits move from the dequantized model's: on
SmolLM2-135M w4a16-rtn (64 random prompt tokens, measured) relative logit error 6.4e-3, mean KL
divergence 0.002, top-1 agreement 0.92; a tiny random Llama 1e-2. Decoding at batch 1 (one
thread, SmolLM2-135M): about 2.4x the float32 model's tokens per second (bench/bench_llm_decode.py).
"""

from __future__ import annotations

from torch import nn

from slimtorch.formats.state import QuantState, clear_state, fractional_zero, get_state
from slimtorch.graph.weights import replace_module
from slimtorch.runtime.int4 import Int4WeightOnlyLinear
from slimtorch.runtime.int8_weight import Int8WeightOnlyLinear


def _quantized_linears(model: nn.Module) -> list[tuple[str, nn.Linear, QuantState]]:
    """``(name, module, state)`` of every Linear with quantized weights and no mask."""
    found = []
    for name, module in list(model.named_modules()):
        state = get_state(module, "weight") if isinstance(module, nn.Linear) else None
        q = state.quant if state is not None else None
        if state is None or q is None or state.mask is not None or q.scheme != "affine":
            continue
        assert isinstance(module, nn.Linear)
        found.append((name, module, q))
    return found


def _swap(model: nn.Module, name: str, module: nn.Linear, new: nn.Module) -> None:
    clear_state(module, "weight")
    replace_module(model, name, new)


def use_int4_kernels(model: nn.Module) -> list[str]:
    """Swap every Linear holding 2-4-bit affine weights (no mask) for an
    :class:`~slimtorch.runtime.int4.Int4WeightOnlyLinear` running torch's int4 CPU kernel
    (bf16 activations: outputs within about 1e-2 relative of the dequantized model)."""
    swapped = []
    for name, module, q in _quantized_linears(model):
        if q.bits > 4 or q.granularity == "per_tensor" or fractional_zero(q):
            continue  # the kernel's zero points are whole numbers (uint8)
        bias = module.bias.detach() if module.bias is not None else None
        _swap(model, name, module, Int4WeightOnlyLinear.from_state(q, bias))
        swapped.append(name)
    return swapped


def use_int8_kernels(model: nn.Module) -> list[str]:
    """Swap every Linear holding 5-8-bit affine per-channel (or per-tensor) weights (no mask)
    for an :class:`~slimtorch.runtime.int8_weight.Int8WeightOnlyLinear` running torch's int8
    weight-only CPU kernel (bf16 activations, about 3e-3 relative error). A tied LM head is
    swapped on its own: the embedding keeps the shared dequantized parameter for its lookups."""
    swapped = []
    for name, module, q in _quantized_linears(model):
        if not 5 <= q.bits <= 8 or q.granularity == "per_group":
            continue
        bias = module.bias.detach() if module.bias is not None else None
        _swap(model, name, module, Int8WeightOnlyLinear.from_state(q, bias))
        swapped.append(name)
    return swapped


def use_kernels(model: nn.Module) -> list[str]:
    """:func:`use_int4_kernels` then :func:`use_int8_kernels`: the names of the swapped
    Linears."""
    return use_int4_kernels(model) + use_int8_kernels(model)
