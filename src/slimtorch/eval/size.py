"""Parameter counts and sizes."""

from __future__ import annotations

import torch
from torch import nn


def count_params(model: nn.Module) -> tuple[int, int]:
    """``(params, nonzero_params)`` over the model's floating parameters and weight buffers.

    Runtime modules that hold integer weights as buffers (e.g. int8 Linear) count those weights
    as parameters, so the figures compare across compressed forms of one model.
    """
    total = nonzero = 0
    seen: set[int] = set()
    for _, t in _weights(model):
        key = t.data_ptr()
        if key in seen and t.numel() > 0:
            continue
        seen.add(key)
        total += t.numel()
        nonzero += int(torch.count_nonzero(t))
    return total, nonzero


def _weights(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    out = [(n, p.detach()) for n, p in model.named_parameters()]
    for n, b in model.named_buffers():
        if n.rsplit(".", 1)[-1].startswith("weight") and b.dtype in (torch.int8, torch.uint8):
            out.append((n, b))
    return out
