"""Write safetensors files, and whole output directories, one tensor at a time.

The safetensors layout is simple enough to write without holding the tensors: an 8-byte
little-endian header length, a JSON header ``{name: {"dtype", "shape", "data_offsets"}}`` padded
with spaces to a multiple of 8 bytes, then the raw little-endian bytes of every tensor in offset
order. Knowing every name, shape and dtype in advance (the header), each tensor is written as soon
as it is produced and dropped, and the sha256 is computed on the way.

:class:`StreamingArtifactWriter` writes a slimtorch artifact this way (every tensor ``dense``, as
part ``<name>::data``, with the manifest :func:`slimtorch.formats.artifact.write_artifact` would
write); :class:`StreamingSafetensorsDir` writes a plain ``model.safetensors`` plus extra files (a
Hugging Face directory). Both are atomic like ``write_artifact``: a hidden sibling directory,
fsynced, then renamed into place, with the same overwrite rules.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO

import torch

from slimtorch import __version__
from slimtorch.core.errors import ArtifactError
from slimtorch.formats.artifact import _RESERVED, FORMAT, FORMAT_VERSION, PART_SEP
from slimtorch.formats.atomic import (
    MANIFEST_FILE,
    MODEL_FILE,
    check_target,
    fsync_dir,
    swap_into_place,
    temp_sibling,
    write_file,
)
from slimtorch.formats.quant_parts import dtype_name

ST_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint64: "U64",
    torch.uint32: "U32",
    torch.uint16: "U16",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
TORCH_DTYPES: dict[str, torch.dtype] = {v: k for k, v in ST_DTYPES.items()}


@dataclass(frozen=True)
class TensorSpec:
    """The name, shape and dtype of a tensor that will be written."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return torch.Size(self.shape).numel() * self.dtype.itemsize


def safetensors_header(specs: Sequence[TensorSpec], metadata: Mapping[str, str] | None) -> bytes:
    """The 8-byte length and padded JSON header of a safetensors file holding ``specs`` in order."""
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for spec in specs:
        if spec.name in header:
            raise ValueError(f"tensor name {spec.name!r} appears twice")
        if spec.dtype not in ST_DTYPES:
            raise ValueError(f"{spec.name}: dtype {spec.dtype} cannot be stored in safetensors")
        end = offset + spec.nbytes
        header[spec.name] = {
            "dtype": ST_DTYPES[spec.dtype],
            "shape": list(spec.shape),
            "data_offsets": [offset, end],
        }
        offset = end
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def safetensors_size(specs: Sequence[TensorSpec], metadata: Mapping[str, str] | None) -> int:
    """Exact size in bytes of the safetensors file :class:`SafetensorsStreamWriter` would write."""
    return len(safetensors_header(specs, metadata)) + sum(s.nbytes for s in specs)


class SafetensorsStreamWriter:
    """Writes the tensors of ``specs`` to ``file`` in that order, hashing the bytes as they go."""

    def __init__(
        self, file: BinaryIO, specs: Sequence[TensorSpec], metadata: Mapping[str, str] | None
    ) -> None:
        if sys.byteorder != "little":  # pragma: no cover - every supported platform is LE
            raise ArtifactError("streaming safetensors writing needs a little-endian machine")
        self._file = file
        self._specs = list(specs)
        self._next = 0
        self._sha = hashlib.sha256()
        self.bytes = 0
        self._emit(safetensors_header(self._specs, metadata))

    def _emit(self, data: bytes | memoryview) -> None:
        self._file.write(data)
        self._sha.update(data)
        self.bytes += len(data)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write the next tensor; its name, shape and dtype must be those announced."""
        if self._next >= len(self._specs):
            raise ValueError(f"tensor {name!r} was not announced; all tensors are written")
        spec = self._specs[self._next]
        if name != spec.name:
            raise ValueError(f"expected tensor {spec.name!r} next, got {name!r}")
        if tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype:
            raise ValueError(
                f"{name}: got {tuple(tensor.shape)} {tensor.dtype}, announced"
                f" {spec.shape} {spec.dtype}"
            )
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        if flat.numel():
            self._emit(flat.view(torch.uint8).numpy().data)
        self._next += 1

    def finish(self) -> tuple[str, int]:
        """``(sha256, bytes)`` of the file; every announced tensor must have been written."""
        if self._next != len(self._specs):
            missing = [s.name for s in self._specs[self._next :]]
            raise ValueError(f"{len(missing)} announced tensors were not written: {missing[:5]}")
        return self._sha.hexdigest(), self.bytes


class _StreamingDir:
    """An output directory built in a hidden sibling and renamed into place on success."""

    def __init__(self, path: str | Path, overwrite: bool) -> None:
        self.path = Path(path)
        self.overwrite = overwrite
        self._tmp: Path | None = None
        self._file: BinaryIO | None = None
        self._writer: SafetensorsStreamWriter | None = None

    def _open(self, specs: Sequence[TensorSpec], metadata: Mapping[str, str] | None) -> None:
        check_target(self.path, self.overwrite)
        tmp = temp_sibling(self.path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp.mkdir()
            self._tmp = tmp
            self._file = open(tmp / MODEL_FILE, "wb")  # noqa: SIM115 - closed in _commit/_abort
            self._writer = SafetensorsStreamWriter(self._file, specs, metadata)
        except OSError as exc:
            self._abort()
            raise self._os_error(exc) from exc

    def _os_error(self, exc: OSError) -> ArtifactError:
        return ArtifactError(
            f"could not write {self.path}: {exc}; check that its parent directory is writable"
            " and has free space"
        )

    def _stream(self) -> SafetensorsStreamWriter:
        if self._writer is None:
            raise ValueError("the writer is not open: use it as a context manager")
        return self._writer

    def _commit(self, files: Mapping[str, bytes]) -> tuple[str, int]:
        assert self._file is not None and self._tmp is not None  # set by _open
        try:
            sha, size = self._stream().finish()
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            for name, data in files.items():
                write_file(self._tmp / name, data)
            fsync_dir(self._tmp)
            swap_into_place(self._tmp, self.path, self.overwrite)
        except OSError as exc:
            self._abort()
            raise self._os_error(exc) from exc
        self._tmp = None
        return sha, size

    def _abort(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is not None:
            self._abort()
            return
        try:
            self.close()
        except BaseException:
            self._abort()
            raise

    def close(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError


def dense_meta(tensor: torch.Tensor) -> dict[str, Any]:
    """The manifest entry of ``tensor`` stored with the ``dense`` encoding, no compression state.

    Exactly what :func:`slimtorch.formats.encoding.encode_tensor` records for a dense tensor
    (keys whose value is None or False are left out); a test pins the two together.
    """
    return {
        "encoding": "dense",
        "shape": list(tensor.shape),
        "dtype": dtype_name(tensor.dtype),
        "numel": tensor.numel(),
        "nonzero": int(torch.count_nonzero(tensor)),
        "bytes": tensor.numel() * tensor.element_size(),
        "parts": ["data"],
    }


class StreamingArtifactWriter(_StreamingDir):
    """Writes a slimtorch artifact tensor by tensor; ``manifest`` holds the caller's keys.

    Use as a context manager: ``write`` every tensor of ``specs`` in order; the artifact appears
    at ``path`` when the block ends without error, and nothing is left behind otherwise.
    """

    def __init__(
        self,
        path: str | Path,
        specs: Sequence[TensorSpec],
        manifest: Mapping[str, Any],
        overwrite: bool = False,
        aliases: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(path, overwrite)
        self.aliases = dict(aliases or {})  # name -> the written tensor it shares storage with
        clash = [k for k in _RESERVED if k in manifest]
        if clash:
            raise ArtifactError(f"manifest keys {clash} are reserved by the artifact format")
        bad = [s.name for s in specs if PART_SEP in s.name]
        if bad:
            raise ArtifactError(f"tensor name {bad[0]!r} contains {PART_SEP!r}; rename the tensor")
        try:
            json.dumps(dict(manifest))
        except (TypeError, ValueError) as exc:
            raise ArtifactError(
                f"manifest is not JSON-serializable ({exc}); pass plain data"
            ) from exc
        self.specs = list(specs)
        self.extra = dict(manifest)
        self.metas: dict[str, Any] = {}
        self.manifest: dict[str, Any] | None = None

    def __enter__(self) -> StreamingArtifactWriter:
        parts = [TensorSpec(f"{s.name}{PART_SEP}data", s.shape, s.dtype) for s in self.specs]
        self._open(parts, {"format": FORMAT})
        return self

    def write(self, name: str, tensor: torch.Tensor) -> None:
        self._stream().write(f"{name}{PART_SEP}data", tensor)
        self.metas[name] = dense_meta(tensor)

    def close(self) -> None:
        manifest: dict[str, Any] = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            **self.extra,
            "slimtorch_version": __version__,
            "tensors": self.metas,
            "aliases": self.aliases,
            "files": {},
        }
        sha, size = self._stream().finish()
        manifest["files"] = {MODEL_FILE: {"sha256": sha, "bytes": size}}
        text = json.dumps(manifest, separators=(",", ":")).encode("utf-8")
        self._commit({MANIFEST_FILE: text})
        self.manifest = manifest


class StreamingSafetensorsDir(_StreamingDir):
    """Writes ``model.safetensors`` (plain tensor names) tensor by tensor, plus ``files``.

    ``files`` maps file names to their bytes (``config.json``, tokenizer files, ...).
    """

    def __init__(
        self,
        path: str | Path,
        specs: Sequence[TensorSpec],
        files: Mapping[str, bytes],
        overwrite: bool = False,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(path, overwrite)
        bad = [n for n in files if Path(n).name != n or n in (MODEL_FILE, "") or n.startswith(".")]
        if bad:
            raise ArtifactError(f"cannot write extra file {bad[0]!r}: give a plain file name")
        self.specs = list(specs)
        self.files = dict(files)
        self.metadata = dict(metadata or {"format": "pt"})
        self.sha256: str | None = None
        self.bytes = 0

    def __enter__(self) -> StreamingSafetensorsDir:
        self._open(self.specs, self.metadata)
        return self

    def write(self, name: str, tensor: torch.Tensor) -> None:
        self._stream().write(name, tensor)

    def close(self) -> None:
        self.sha256, self.bytes = self._commit(self.files)
