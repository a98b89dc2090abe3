"""Which accelerated kernel runs on which device, and one clear message when none does.

Every check is a function called at run time with the device of the tensor about to be
multiplied: importing slimtorch touches no CUDA. A CUDA check on a build without CUDA, or with
no device visible, answers False and never raises.

    int4 weight-only  torch._weight_int4pack_mm        CUDA compute capability >= 8.0 (Ampere)
    fp8 (e4m3)        torch._scaled_mm                 CUDA compute capability >= 8.9 (Ada,
                                                       Hopper); torch's CPU build also has it
    2:4 sparse        torch.sparse.to_sparse_semi_structured  CUDA capability >= 8.0,
                                                       float16 / bfloat16 weights

Where a module cannot use its kernel it falls back to a dequantized / dense product and logs
the reason once per (kernel, device, reason) with :func:`fallback`.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

INT4_CUDA_CAPABILITY = (8, 0)
FP8_CUDA_CAPABILITY = (8, 9)
SPARSE24_CUDA_CAPABILITY = (8, 0)

_warned: set[tuple[str, str, str]] = set()


def cuda_capability(device: torch.device | str) -> tuple[int, int] | None:
    """``(major, minor)`` of a CUDA ``device``; None for another device type or no CUDA."""
    dev = torch.device(device)
    if dev.type != "cuda" or not torch.cuda.is_available():
        return None
    try:
        major, minor = torch.cuda.get_device_capability(dev)
    except (AssertionError, RuntimeError):
        return None
    return int(major), int(minor)


def has_capability(device: torch.device | str, needed: tuple[int, int]) -> bool:
    """Whether ``device`` is a CUDA device of at least compute capability ``needed``."""
    cap = cuda_capability(device)
    return cap is not None and cap >= needed


def int4_cuda_available(device: torch.device | str) -> bool:
    """Whether torch's CUDA int4 weight-only matmul (tinygemm) runs on ``device``."""
    ops = torch.ops.aten
    has_ops = hasattr(ops, "_weight_int4pack_mm") and hasattr(ops, "_convert_weight_to_int4pack")
    return has_ops and has_capability(device, INT4_CUDA_CAPABILITY)


def scaled_mm_available(device: torch.device | str) -> bool:
    """Whether ``torch._scaled_mm`` (float8 e4m3 GEMM) runs on ``device``: CUDA of capability
    8.9 or newer, or the CPU (torch's oneDNN implementation, for correctness checks)."""
    if not hasattr(torch, "_scaled_mm") or not hasattr(torch, "float8_e4m3fn"):
        return False
    dev = torch.device(device)
    if dev.type == "cpu":
        return True
    return has_capability(dev, FP8_CUDA_CAPABILITY)


def semi_structured_available(device: torch.device | str) -> bool:
    """Whether ``torch.sparse.to_sparse_semi_structured`` (2:4 sparse GEMM) runs on ``device``."""
    return hasattr(torch.sparse, "to_sparse_semi_structured") and has_capability(
        device, SPARSE24_CUDA_CAPABILITY
    )


def describe(device: torch.device | str) -> str:
    """A short human description: ``cuda:0 (NVIDIA H100 80GB HBM3, capability 9.0)``."""
    dev = torch.device(device)
    cap = cuda_capability(dev)
    if cap is None:
        return str(dev)
    return f"{dev} ({torch.cuda.get_device_name(dev)}, capability {cap[0]}.{cap[1]})"


def fallback(kernel: str, device: torch.device | str, reason: str) -> None:
    """Log once that ``kernel`` cannot run on ``device`` and a slower path is used instead."""
    key = (kernel, str(device), reason)
    if key in _warned:
        return
    _warned.add(key)
    log.warning("%s kernel not used on %s: %s", kernel, describe(device), reason)
