"""Per-tensor GGUF types under a bits-per-weight (or file-size) budget: pure functions.

``slimtorch auto --max-bpw B`` gives every 2-D weight of a Llama-family model one GGUF type
(``Q4_0`` ... ``Q8_0``, ``Q4_K`` ... ``Q6_K``) so that the predicted KL divergence to the base
is least while the file's tensors hold at most ``B`` bits per weight, counted as llama.cpp
counts it (the bytes of every tensor of the file, norms included, times 8, over the number of
their elements). The predicted divergence of a type for a tensor comes from the sensitivity
scan (:mod:`slimtorch.search.bpw_scan`); the choice is :func:`slimtorch.search.allocate.allocate`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from slimtorch.core.errors import UserInputError
from slimtorch.export.gguf_mix import PLAN_TYPES
from slimtorch.search.allocate import Costs, allocate, total

DEFAULT_TYPES = ("Q4_0", "Q5_0", "Q8_0", "Q4_K", "Q5_K", "Q6_K")
MIN_BPW = 4.5  # Q4_0 / Q4_K everywhere: the smallest types a plan may use


def tensor_bytes(ggml_type: str, shape: Sequence[int]) -> int:
    """Bytes of a tensor of ``shape`` stored as ``ggml_type`` (``F32`` / ``F16`` too)."""
    numel = math.prod(shape)
    if ggml_type in ("F32", "F16"):
        return numel * (4 if ggml_type == "F32" else 2)
    block, size = PLAN_TYPES[ggml_type]
    return numel // block * size


def type_options(shape: Sequence[int], types: Sequence[str]) -> list[str]:
    """The types of ``types`` a weight of ``shape`` may take: k-quants only when its rows
    (input features) are a multiple of 256, the 32-blocks when a multiple of 32; F16 when
    none fits."""
    cols = int(shape[-1])
    fits = [t for t in types if cols % PLAN_TYPES[t][0] == 0]
    return fits or ["F16"]


def parse_types(spec: str | Sequence[str] | None) -> tuple[str, ...]:
    """``"Q4_0,Q5_0,Q8_0"`` (or a list) -> the types, checked; None -> :data:`DEFAULT_TYPES`."""
    if spec is None:
        return DEFAULT_TYPES
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    names = tuple(dict.fromkeys(t.strip().upper() for t in items if t.strip()))
    bad = [t for t in names if t not in PLAN_TYPES]
    if bad or not names:
        raise UserInputError(
            f"--gguf-types {spec!r}: {', '.join(bad) or 'no type'} is not a type a plan may use;"
            f" give a comma-separated list of {', '.join(PLAN_TYPES)}"
        )
    return names


def check_max_bpw(value: object) -> float:
    """``--max-bpw`` as a float, or :class:`UserInputError` saying what is allowed."""
    try:
        bpw = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise UserInputError(
            f"--max-bpw {value!r} is not a number; give bits per weight, e.g. --max-bpw 4.9"
        ) from None
    if not math.isfinite(bpw) or bpw < MIN_BPW or bpw > 32:
        raise UserInputError(
            f"--max-bpw {value} is outside {MIN_BPW}..32: GGUF's smallest types here (Q4_0,"
            f" Q4_K) take {MIN_BPW} bits per weight, F32 takes 32"
        )
    return bpw


def budget_bytes(
    max_bpw: float | None, numel: int, fixed: int, max_bytes: int | None = None
) -> int:
    """Bytes the planned weights may take: ``max_bpw`` bits over all ``numel`` elements of the
    file's tensors and/or ``max_bytes`` of the file, less the ``fixed`` bytes (norms, metadata)."""
    limits = []
    if max_bpw is not None:
        limits.append(math.floor(max_bpw * numel / 8))
    if max_bytes is not None:
        limits.append(int(max_bytes))
    if not limits:
        raise UserInputError("give --max-bpw or --max-size: the plan needs a budget")
    return min(limits) - fixed


def plan(costs: Costs, budget: int) -> dict[str, str] | None:
    """The per-tensor types of least predicted divergence whose bytes fit ``budget`` (None:
    even the smallest types do not fit)."""
    return allocate(costs, budget)


def summary(
    costs: Costs, assign: Mapping[str, str], numel: int, fixed: int
) -> dict[str, float | int]:
    """Bytes, bits per weight (llama.cpp's count: every tensor) and predicted KLD of a plan."""
    b, d = total(costs, assign)
    return {"tensor_bytes": b + fixed, "bpw": 8 * (b + fixed) / numel, "predicted_kld": d}
