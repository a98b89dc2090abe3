"""Join artifacts holding disjoint tensors into one, one source at a time.

The sequential compression of a large model writes each finished block as its own small
artifact (so an interrupted run resumes from the last one); :func:`concat_artifacts` then
streams their stored parts, unchanged, into one ``model.safetensors`` with a merged manifest.
Memory is one source artifact at a time; the result is byte-for-byte what it would be had the
parts been written together.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from safetensors.torch import load as st_load

from slimtorch import __version__
from slimtorch.core.errors import ArtifactError
from slimtorch.formats.artifact import (
    _RESERVED,
    FORMAT,
    FORMAT_VERSION,
    _verified_bytes,
    read_manifest,
)
from slimtorch.formats.atomic import MANIFEST_FILE, MODEL_FILE
from slimtorch.formats.streaming import TORCH_DTYPES, TensorSpec, _StreamingDir


def part_specs(path: Path) -> list[TensorSpec]:
    """The parts stored in an artifact's ``model.safetensors``, in file order (header only)."""
    with open(path / MODEL_FILE, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    entries = [(k, v) for k, v in header.items() if k != "__metadata__"]
    entries.sort(key=lambda kv: kv[1]["data_offsets"][0])
    return [TensorSpec(k, tuple(v["shape"]), TORCH_DTYPES[v["dtype"]]) for k, v in entries]


class _Joined(_StreamingDir):
    def __init__(self, path: Path, specs: list[TensorSpec], overwrite: bool) -> None:
        super().__init__(path, overwrite)
        self.specs = specs

    def __enter__(self) -> _Joined:
        self._open(self.specs, {"format": FORMAT})
        return self

    def write(self, name: str, tensor: Any) -> None:
        self._stream().write(name, tensor)

    def finish(self, manifest: dict[str, Any]) -> dict[str, Any]:
        sha, size = self._stream().finish()
        manifest["files"] = {MODEL_FILE: {"sha256": sha, "bytes": size}}
        text = json.dumps(manifest, separators=(",", ":")).encode("utf-8")
        self._commit({MANIFEST_FILE: text})  # finish() is idempotent
        return manifest

    def close(self) -> None:
        """Committed by :meth:`finish`; leaving the block without it aborts."""


def concat_artifacts(
    sources: Sequence[str | Path],
    out: str | Path,
    manifest: Mapping[str, Any],
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write one artifact at ``out`` holding every tensor of ``sources`` (disjoint names);
    ``manifest`` gives the top-level keys (architecture, metadata, ...)."""
    clash = [k for k in _RESERVED if k in manifest]
    if clash:
        raise ArtifactError(f"manifest keys {clash} are reserved by the artifact format")
    paths = [Path(s) for s in sources]
    specs: list[TensorSpec] = []
    metas: dict[str, Any] = {}
    aliases: dict[str, str] = {}
    for path in paths:
        sub = read_manifest(path)
        dup = sorted(set(sub["tensors"]) & set(metas))
        if dup:
            raise ArtifactError(f"{path}: tensors {dup[:3]} also stored by an earlier source")
        metas.update(sub["tensors"])
        aliases.update(sub.get("aliases", {}))
        specs += part_specs(path)
    final: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        **dict(manifest),
        "slimtorch_version": __version__,
        "tensors": metas,
        "aliases": aliases,
    }
    joined = _Joined(Path(out), specs, overwrite)
    with joined:
        for path in paths:
            info = read_manifest(path)["files"][MODEL_FILE]
            parts = st_load(_verified_bytes(path, MODEL_FILE, info))
            for spec in part_specs(path):
                joined.write(spec.name, parts[spec.name])
            del parts
        result = joined.finish(final)
    return result
