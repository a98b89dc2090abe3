"""Comparing artifacts byte for byte in tests."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Any


def stored_parts(path: str | Path) -> dict[str, tuple[Any, ...]]:
    """Each stored part of an artifact's ``model.safetensors``: dtype, shape and the sha256 of
    its bytes (two artifacts with equal results hold the same bytes, whatever the header's
    order)."""
    raw = (Path(path) / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    header.pop("__metadata__", None)
    return {
        k: (v["dtype"], v["shape"], hashlib.sha256(raw[8 + n + a : 8 + n + b]).hexdigest())
        for k, v in header.items()
        for a, b in [v["data_offsets"]]
    }
