"""Latency: median wall-clock time of repeated forward passes after warm-up.

The inputs are moved to the model's device (its first parameter's, else its first buffer's,
else the CPU), and on a CUDA device every timed pass ends with a synchronize: kernels run
asynchronously there, so the clock would otherwise stop before the work is done.
"""

from __future__ import annotations

import itertools
import statistics
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from slimtorch.calibrate.loader import to_device

__all__ = ["measure_latency_ms", "model_device", "synchronize", "to_device"]


def model_device(model: nn.Module) -> torch.device:
    """Where ``model`` runs: its first parameter's device, else its first buffer's, else CPU."""
    tensor = next(itertools.chain(model.parameters(), model.buffers()), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on a CUDA ``device`` (nothing to wait for elsewhere)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_latency_ms(
    model: nn.Module, inputs: Sequence[Any], warmup: int = 3, repeats: int = 20
) -> float:
    """Median milliseconds of ``model(*inputs)`` over ``repeats`` runs after ``warmup`` runs,
    with ``inputs`` on the model's device."""
    model.eval()
    device = model_device(model)
    inputs = to_device(tuple(inputs), device)
    times = []
    with torch.inference_mode():
        for _ in range(warmup):
            model(*inputs)
        synchronize(device)
        for _ in range(repeats):
            start = time.perf_counter()
            model(*inputs)
            synchronize(device)
            times.append((time.perf_counter() - start) * 1000.0)
    return float(statistics.median(times))
