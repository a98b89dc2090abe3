"""Describe an artifact: its size, where it came from, and a row per stored tensor."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from slimtorch import api
from slimtorch.formats.artifact import read_manifest
from slimtorch.formats.sizes import describe


def inspect_dir(path: str | Path) -> dict[str, Any]:
    """Size on disk, fp32 size, architecture kind, source, recipe and the per-tensor table."""
    path = api.require_dir(path)
    manifest = read_manifest(path)
    return {
        "dir": str(path),
        "bytes_on_disk": api.artifact_size(path),
        "dense_bytes": manifest.get("metadata", {}).get("dense_bytes"),
        "architecture": manifest.get("architecture", {}).get("kind"),
        "source": manifest.get("metadata", {}).get("source"),
        "recipe": manifest.get("metadata", {}).get("recipe_name"),
        "layers": describe(manifest),
    }
