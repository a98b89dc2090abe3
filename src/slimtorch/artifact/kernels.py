"""Run int4 weight-only Linear layers on torch's int4 CPU kernel (``slimtorch.load(dir,
kernels=True)``)."""

from __future__ import annotations

from torch import nn

from slimtorch.formats.state import clear_state, get_state
from slimtorch.graph.weights import replace_module
from slimtorch.runtime.int4 import Int4WeightOnlyLinear


def use_int4_kernels(model: nn.Module) -> list[str]:
    """Swap every Linear holding 2-4-bit affine weights (no mask) for an
    :class:`~slimtorch.runtime.int4.Int4WeightOnlyLinear` running torch's int4 CPU kernel
    (bf16 activations: outputs within about 1e-2 relative of the dequantized model)."""
    swapped = []
    for name, module in list(model.named_modules()):
        state = get_state(module, "weight") if isinstance(module, nn.Linear) else None
        q = state.quant if state is not None else None
        if state is None or q is None or state.mask is not None:
            continue
        if q.scheme != "affine" or q.bits > 4 or q.granularity == "per_tensor":
            continue
        bias = module.bias.detach() if module.bias is not None else None
        clear_state(module, "weight")
        replace_module(model, name, Int4WeightOnlyLinear.from_state(q, bias))
        swapped.append(name)
    return swapped
