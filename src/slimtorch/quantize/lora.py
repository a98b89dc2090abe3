"""Low-rank adapters on a frozen quantized base (QLoRA-style), as functions: wrap, the
distillation loss, and folding an adapter back into the stored grid.

The base keeps its codes; only the adapters train. :func:`merge_into_grid` folds an adapter into
its Linear and re-quantizes the sum on the layer's own grid (scales and zero points kept, codes
recomputed): the file stays as small as the base's, at the cost of the rounding of the sum.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slimtorch.formats.state import WeightState, apply_state, get_state
from slimtorch.graph.weights import replace_module
from slimtorch.quantize.reconstruct import grid_from_state, grid_state
from slimtorch.runtime.lora_lowbit import LoRALinear, merge_adapter


def distill_loss(student: Tensor, teacher: Tensor, temperature: float = 1.0) -> Tensor:
    """KL(teacher || student) of the next-token distributions, mean over positions, times T^2."""
    t = temperature
    s = F.log_softmax(student.float().reshape(-1, student.shape[-1]) / t, dim=-1)
    p = F.log_softmax(teacher.float().reshape(-1, teacher.shape[-1]) / t, dim=-1)
    return F.kl_div(s, p, log_target=True, reduction="batchmean") * t * t


def wrap_linears(model: nn.Module, names: list[str], rank: int, scale: float) -> list[LoRALinear]:
    """Replace each named Linear by a :class:`LoRALinear` around it; returns the wrappers."""
    out = []
    for name in names:
        layer = model.get_submodule(name)
        assert isinstance(layer, nn.Linear)
        wrapper = LoRALinear(layer, min(rank, layer.in_features, layer.out_features), scale)
        replace_module(model, name, wrapper)
        out.append(wrapper)
    return out


def merge_into_grid(model: nn.Module, name: str) -> None:
    """Fold the adapter at ``name`` into its Linear, re-quantized on the Linear's grid (or left
    in full precision when the Linear has no grid), and put the Linear back in its place."""
    wrapper = model.get_submodule(name)
    assert isinstance(wrapper, LoRALinear)
    layer = wrapper.linear
    merged = merge_adapter(wrapper).to(layer.weight.dtype)
    state = get_state(layer, "weight")
    if state is None or state.quant is None:
        with torch.no_grad():
            layer.weight.copy_(merged)
    else:
        grid = grid_from_state(state.quant, merged, state.mask)
        quant = grid_state(grid, state.quant, tuple(layer.weight.shape))
        apply_state(layer, "weight", WeightState(mask=state.mask, quant=quant, extra=state.extra))
    replace_module(model, name, layer)
