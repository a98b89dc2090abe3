"""Measure a split: per-segment latency, and the ONNX parts run in onnxruntime.

Segments are timed here, one thread, batch of the example inputs: the fastest of repeated
runs after warm-up, in CPU time of the calling thread (:func:`segment_ms`), in onnxruntime (each segment exported to memory) or
PyTorch. The onnxruntime helpers run the exported parts.
"""

from __future__ import annotations

import functools
import itertools
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from slimtorch.search.split_graph import Traced, part


def _fastest_ms(fn: Callable[[], Any], budget_s: float = 2.0, max_repeats: int = 50) -> float:
    """Fastest milliseconds of ``fn()`` over repeated runs after two warm-up calls, in CPU time
    of the calling thread (one-thread PyTorch and onnxruntime run on it): the time on a core of
    its own, which wall time is not when other processes share the cores (they preempt long
    runs more often than short ones, so a whole part and the sum of its segments would not
    compare)."""
    fn()
    start = time.perf_counter()
    fn()
    once = max(time.perf_counter() - start, 1e-6)
    times = []
    for _ in range(max(20, min(max_repeats, int(budget_s / once)))):
        start = time.thread_time()
        fn()
        times.append((time.thread_time() - start) * 1000.0)
    return float(min(times))


def _single_thread() -> Any:
    class _Threads:
        def __enter__(self) -> None:
            self.before = torch.get_num_threads()
            torch.set_num_threads(1)

        def __exit__(self, *exc: object) -> None:
            torch.set_num_threads(self.before)

    return _Threads()


def _ort_segment_ms(module: nn.Module, values: tuple[torch.Tensor, ...]) -> float:
    """Fastest onnxruntime milliseconds of ``module`` exported (TorchScript exporter: fast,
    fixed shapes) to memory."""
    import io
    import warnings

    import onnxruntime as ort

    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, values, buffer, dynamo=False)  # type: ignore[arg-type]
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])
    return ort_ms(session, [v.numpy() for v in values])


def segment_ms(
    traced: Traced, indices: Sequence[int], inputs: tuple[torch.Tensor, ...], runtime: str = "onnx"
) -> tuple[list[float], list[str]]:
    """Fastest milliseconds of each segment between consecutive cuts ``indices`` (one thread),
    in onnxruntime (``runtime="onnx"``: where the parts will run) or PyTorch; a segment the
    fast exporter refuses is timed in PyTorch. Returns the times and where each was taken."""
    times, where = [], []
    values: tuple[torch.Tensor, ...] = inputs
    with torch.inference_mode(), _single_thread():
        for start, stop in itertools.pairwise(indices):
            module = part(traced, start, stop)
            current = values
            taken = "torch"
            if runtime == "onnx":
                try:
                    times.append(_ort_segment_ms(module, current))
                    taken = "onnx"
                except Exception:  # timed in PyTorch instead, and said so
                    taken = "torch"
            if taken == "torch":
                times.append(_fastest_ms(functools.partial(module, *current)))
            where.append(taken)
            values = tuple(module(*current))
    return times, where


def ort_session(path: Path) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def ort_run(session: Any, values: Sequence[np.ndarray]) -> list[np.ndarray]:
    names = [i.name for i in session.get_inputs()]
    return list(session.run(None, dict(zip(names, values, strict=True))))


def ort_ms(session: Any, values: Sequence[np.ndarray]) -> float:
    """Fastest milliseconds of one onnxruntime run (one thread)."""
    return _fastest_ms(lambda: ort_run(session, values))
