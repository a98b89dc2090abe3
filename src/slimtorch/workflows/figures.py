"""The figures shared by the compress and evaluate reports."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from slimtorch import api


def baseline(measured: dict[str, Any]) -> dict[str, Any]:
    """The original model's figures, as ``baseline_*`` keys of a report."""
    keys = ("value", "latency_ms", "params", "nonzero_params")
    return {f"baseline_{k}": measured.get(k) for k in keys}


def summary(out: Path, measured: dict[str, Any], dense_bytes: int) -> dict[str, Any]:
    """Size on disk against the fp32 size, and the measured figures."""
    on_disk = api.artifact_size(out)
    return {
        "bytes_on_disk": on_disk,
        "dense_bytes": dense_bytes,
        "compression_ratio": dense_bytes / on_disk if on_disk else None,
        **measured,
    }
