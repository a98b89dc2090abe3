"""Join artifacts holding disjoint tensors into one, one source at a time.

The sequential compression of a large model writes each finished block as its own small
artifact (so an interrupted run resumes from the last one); :func:`concat_artifacts` then
streams their stored parts, unchanged, into one ``model.safetensors`` with a merged manifest.
Memory is one source artifact at a time; the result is byte-for-byte what it would be had the
parts been written together.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from slimtorch import __version__
from slimtorch.core.errors import ArtifactError, ChecksumError
from slimtorch.formats.artifact import (
    _RESERVED,
    FORMAT,
    FORMAT_VERSION,
    read_manifest,
)
from slimtorch.formats.atomic import MANIFEST_FILE, MODEL_FILE
from slimtorch.formats.streaming import TORCH_DTYPES, TensorSpec, _StreamingDir


def _header(path: Path) -> tuple[int, list[tuple[str, dict[str, Any]]]]:
    with open(path / MODEL_FILE, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    entries = [(k, v) for k, v in header.items() if k != "__metadata__"]
    entries.sort(key=lambda kv: kv[1]["data_offsets"][0])
    return 8 + length, entries


def part_specs(path: Path) -> list[TensorSpec]:
    """The parts stored in an artifact's ``model.safetensors``, in file order (header only)."""
    _, entries = _header(path)
    return [TensorSpec(k, tuple(v["shape"]), TORCH_DTYPES[v["dtype"]]) for k, v in entries]


def _verify(path: Path, info: dict[str, Any]) -> None:
    """sha256 and size of a source's ``model.safetensors``, read in chunks."""
    file = path / MODEL_FILE
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    if file.stat().st_size != info["bytes"] or digest.hexdigest() != info["sha256"]:
        raise ChecksumError(f"{file} does not match its manifest; re-create it")


def _parts(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Each stored part, read on its own (memory: one part at a time)."""
    start, entries = _header(path)
    with open(path / MODEL_FILE, "rb") as f:
        for name, meta in entries:
            begin, end = meta["data_offsets"]
            f.seek(start + begin)
            raw = bytearray(f.read(end - begin))
            dtype = TORCH_DTYPES[meta["dtype"]]
            flat = torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)
            yield name, flat.reshape(meta["shape"])


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
            _verify(path, read_manifest(path)["files"][MODEL_FILE])
            for name, tensor in _parts(path):
                joined.write(name, tensor)
        result = joined.finish(final)
    return result
