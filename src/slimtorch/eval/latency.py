"""Latency: median wall-clock time of repeated forward passes after warm-up."""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn


def measure_latency_ms(
    model: nn.Module, inputs: Sequence[Any], warmup: int = 3, repeats: int = 20
) -> float:
    """Median milliseconds of ``model(*inputs)`` over ``repeats`` runs after ``warmup`` runs."""
    model.eval()
    times = []
    with torch.inference_mode():
        for _ in range(warmup):
            model(*inputs)
        for _ in range(repeats):
            start = time.perf_counter()
            model(*inputs)
            times.append((time.perf_counter() - start) * 1000.0)
    return float(statistics.median(times))
