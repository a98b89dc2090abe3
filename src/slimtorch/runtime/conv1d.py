"""Hugging Face ``Conv1D`` (GPT-2's attention and MLP maps) as an ordinary ``nn.Linear``.

``Conv1D`` computes ``x @ W + b`` with ``W`` stored ``[in, out]``: a linear map whose weight is
the transpose of nn.Linear's. Every slimtorch technique works on ``[out, in]`` weights (per-
channel scales, groups along the input, N:M along the input, GPTQ's Hessian of the input), so
:func:`linearize_conv1d` swaps each ``Conv1D`` for a :class:`Conv1DLinear` holding ``W.T``: the
same function, now found by every stage that handles ``Linear``. The artifact records the swap
(a runtime module), so ``slimtorch.load`` rebuilds the model the same way, and exports back to
Hugging Face transpose the weight again.
"""

from __future__ import annotations

import torch
from torch import nn

from slimtorch.graph.weights import replace_module
from slimtorch.runtime.shapes import LinearShape


class Conv1DLinear(LinearShape, nn.Linear):
    """An ``nn.Linear`` that stands for a Hugging Face ``Conv1D`` (weight ``[out, in]``)."""


def is_hf_conv1d(module: nn.Module) -> bool:
    """A transformers ``Conv1D``: ``weight [in, out]`` and ``nf`` output features."""
    weight = getattr(module, "weight", None)
    return (
        type(module).__name__ == "Conv1D"
        and isinstance(weight, torch.Tensor)
        and weight.dim() == 2
        and weight.shape[1] == getattr(module, "nf", None)
    )


def as_linear(module: nn.Module) -> Conv1DLinear:
    """The :class:`Conv1DLinear` computing what the ``Conv1D`` ``module`` computes."""
    weight = module.weight
    bias = getattr(module, "bias", None)
    assert isinstance(weight, torch.Tensor)
    n_in, n_out = weight.shape
    meta = weight.device.type == "meta"
    with torch.device("meta" if meta else weight.device):
        linear = Conv1DLinear(n_in, n_out, bias=bias is not None, dtype=weight.dtype)
    linear.weight = nn.Parameter(weight.detach().t().contiguous(), weight.requires_grad)
    if isinstance(bias, torch.Tensor):
        linear.bias = nn.Parameter(bias.detach().clone(), bias.requires_grad)
    return linear


def linearize_conv1d(model: nn.Module) -> list[str]:
    """Replace every Hugging Face ``Conv1D`` of ``model`` in place; returns their names."""
    names = [name for name, module in model.named_modules() if name and is_hf_conv1d(module)]
    for name in names:
        replace_module(model, name, as_linear(model.get_submodule(name)))
    return names
