"""The on-disk artifact: a directory with ``model.safetensors`` and ``manifest.json``.

``model.safetensors`` holds the encoded parts of every tensor, named ``<tensor>::<part>`` (see
:mod:`slimtorch.formats.encoding`). ``manifest.json`` holds::

    {"format": "slimtorch", "format_version": 1, "slimtorch_version": "...",
     <caller keys: "architecture", "modules", "metadata", ...>,
     "tensors": {name: meta}, "aliases": {name: name_it_aliases},
     "files": {"model.safetensors": {"sha256": "...", "bytes": N}}}

Tensors sharing storage (tied embeddings) are stored once and listed in ``aliases``. Writing is
atomic: everything is built in a hidden sibling directory, fsynced, then renamed into place, so
a failure never leaves a half-written artifact nor touches an existing one. Reading verifies
sizes and checksums before decoding anything. No pickle anywhere.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from slimtorch import __version__
from slimtorch.core.errors import ArtifactError, ChecksumError
from slimtorch.formats.atomic import (
    MANIFEST_FILE,
    MODEL_FILE,
    check_target,
    fsync_dir,
    swap_into_place,
    temp_sibling,
    write_file,
)
from slimtorch.formats.encoding import decode_tensor, encode_tensor
from slimtorch.formats.state import WeightState

FORMAT = "slimtorch"
FORMAT_VERSION = 1
PART_SEP = "::"
_RESERVED = ("format", "format_version", "tensors", "aliases", "files")
RECREATE = "re-create it with `slimtorch compress ... --force`"


@dataclass
class Artifact:
    """A loaded artifact: its manifest, effective tensor values and compression states."""

    manifest: dict[str, Any]
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    states: dict[str, WeightState] = field(default_factory=dict)


def _storage_key(t: torch.Tensor) -> tuple[Any, ...] | None:
    if t.numel() == 0 or t.layout != torch.strided or t.device.type == "meta":
        return None
    ptr = t.untyped_storage().data_ptr()
    return (str(t.device), ptr, t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)


def find_aliases(tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    """``{name: first_name}`` for tensors that are the same view of one storage as an earlier one."""
    seen: dict[tuple[Any, ...], str] = {}
    aliases = {}
    for name, t in tensors.items():
        key = _storage_key(t)
        if key is None:
            continue
        if key in seen:
            aliases[name] = seen[key]
        else:
            seen[key] = name
    return aliases


def _unshare(parts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Clone parts whose storage another part already uses (safetensors refuses shared storage)."""
    seen: set[int] = set()
    out = {}
    for key, t in parts.items():
        ptr = t.untyped_storage().data_ptr() if t.numel() else 0
        if ptr and ptr in seen:
            t = t.clone()
        seen.add(ptr)
        out[key] = t.contiguous()
    return out


def _encode_all(
    tensors: dict[str, torch.Tensor],
    states: dict[str, WeightState],
    aliases: dict[str, str],
    entropy: str = "none",
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    unknown = sorted(set(states) - set(tensors))
    if unknown:
        raise ArtifactError(
            f"compression states for {unknown[:5]} have no tensor of that name; pass the"
            " model's state_dict and states keyed by the same names"
        )
    parts: dict[str, torch.Tensor] = {}
    metas: dict[str, Any] = {}
    shared: dict[int, str] = {}  # codebook storage -> tensor that stores it
    for name, t in tensors.items():
        if PART_SEP in name:
            raise ArtifactError(f"tensor name {name!r} contains {PART_SEP!r}; rename the tensor")
        if name in aliases:
            continue
        group = [name] + [a for a, target in aliases.items() if target == name]
        state = next((states[n] for n in group if n in states), None)
        try:
            tensor_parts, metas[name] = encode_tensor(t, state, name, entropy, shared)
        except (ValueError, TypeError) as exc:
            raise ArtifactError(f"cannot encode tensor {name!r}: {exc}") from exc
        parts.update({f"{name}{PART_SEP}{p}": v for p, v in tensor_parts.items()})
    return _unshare(parts), metas


def _build_manifest(
    extra: dict[str, Any], metas: dict[str, Any], aliases: dict[str, str], data: bytes
) -> dict[str, Any]:
    clash = [k for k in _RESERVED if k in extra]
    if clash:
        raise ArtifactError(
            f"manifest keys {clash} are reserved by the artifact format; rename them"
        )
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        **extra,
        "slimtorch_version": __version__,
        "tensors": metas,
        "aliases": aliases,
        "files": {MODEL_FILE: {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}},
    }


def write_artifact(
    path: str | Path,
    tensors: dict[str, torch.Tensor],
    states: dict[str, WeightState],
    manifest: dict[str, Any],
    overwrite: bool = False,
    entropy: str = "none",
) -> dict[str, Any]:
    """Write an artifact directory atomically and return its final manifest.

    ``tensors`` is a state_dict, ``states`` the compression states keyed by the same names,
    ``manifest`` the caller's extra keys. An existing ``path`` is refused unless ``overwrite``.
    ``entropy="huffman"`` lets code and index streams be Huffman coded where that is smaller.
    """
    path = Path(path)
    check_target(path, overwrite)
    aliases = find_aliases(tensors)
    parts, metas = _encode_all(tensors, states, aliases, entropy)
    data = st_save(parts, metadata={"format": FORMAT})
    final = _build_manifest(dict(manifest), metas, aliases, data)
    try:
        text = json.dumps(final, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise ArtifactError(f"manifest is not JSON-serializable ({exc}); pass plain data") from exc
    tmp = temp_sibling(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
        write_file(tmp / MODEL_FILE, data)
        write_file(tmp / MANIFEST_FILE, text.encode("utf-8"))
        fsync_dir(tmp)
        swap_into_place(tmp, path, overwrite)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ArtifactError(
            f"could not write artifact {path}: {exc}; check that its parent directory is"
            " writable and has free space"
        ) from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _validate_manifest(m: Any, where: Path) -> dict[str, Any]:
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise ArtifactError(
            f'{where} is not a slimtorch manifest (no "format": "{FORMAT}"); {RECREATE}'
        )
    version = m.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ArtifactError(f"{where}: invalid format_version {version!r}; {RECREATE}")
    if version > FORMAT_VERSION:
        raise ArtifactError(
            f"{where} was written by a newer slimtorch ({m.get('slimtorch_version')}, format_version"
            f" {version}); this slimtorch {__version__} reads format_version <= {FORMAT_VERSION}:"
            " upgrade slimtorch"
        )
    for key in ("tensors", "aliases", "files"):
        if not isinstance(m.get(key), dict):
            raise ArtifactError(
                f"{where}: manifest key {key!r} is missing or malformed; {RECREATE}"
            )
    for name, info in m["files"].items():
        ok = isinstance(info, dict) and isinstance(info.get("sha256"), str)
        if (
            not ok
            or not isinstance(info.get("bytes"), int)
            or Path(name).name != name
            or name.startswith(".")
        ):
            raise ArtifactError(f"{where}: malformed files entry {name!r}; {RECREATE}")
    if MODEL_FILE not in m["files"]:
        raise ArtifactError(f"{where}: manifest lists no {MODEL_FILE}; {RECREATE}")
    return m


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The validated manifest of the artifact at ``path`` (tensors are not read)."""
    path = Path(path)
    if not path.exists():
        raise ArtifactError(
            f"no artifact at {path}: the directory does not exist; give the --out directory"
            " of `slimtorch compress`"
        )
    if not path.is_dir():
        raise ArtifactError(f"{path} is a file, not an artifact directory; give the directory")
    mf = path / MANIFEST_FILE
    if not mf.is_file():
        raise ArtifactError(
            f"{path} has no {MANIFEST_FILE}: it is not a slimtorch artifact or was not written"
            f" completely; {RECREATE}"
        )
    try:
        manifest = json.loads(mf.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ArtifactError(
            f"{mf} is not valid JSON ({exc}); the artifact is corrupted; {RECREATE}"
        ) from exc
    return _validate_manifest(manifest, mf)


def _verified_bytes(path: Path, name: str, info: dict[str, Any]) -> bytes:
    file = path / name
    if not file.is_file():
        raise ArtifactError(f"{file} is missing: the artifact is incomplete; {RECREATE}")
    size = file.stat().st_size
    data = file.read_bytes() if size == info["bytes"] else b""
    if size != info["bytes"] or hashlib.sha256(data).hexdigest() != info["sha256"]:
        raise ChecksumError(
            f"{name} in {path} does not match the sha256/size recorded in {MANIFEST_FILE}"
            f" ({size} bytes on disk, {info['bytes']} expected): the artifact is corrupted or"
            f" truncated and must be re-created (`slimtorch compress ... --force`)"
        )
    return data


def _decode_all(manifest: dict[str, Any], parts: dict[str, torch.Tensor], where: Path) -> Artifact:
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in parts.items():
        name, _, part = key.rpartition(PART_SEP)
        grouped.setdefault(name, {})[part] = t
    art = Artifact(manifest)
    for name, meta in manifest["tensors"].items():
        have = dict(grouped.get(name, {}))
        ref = meta.get("codebook_ref") if isinstance(meta, dict) else None
        if ref is not None:
            have["codebook"] = grouped.get(str(ref), {}).get("codebook", torch.empty(0))
        try:
            missing = [p for p in meta["parts"] if p not in have]
            if missing:
                raise ArtifactError(
                    f"{where}: tensor {name!r} is missing parts {missing} in {MODEL_FILE}; the"
                    f" artifact is incomplete; {RECREATE}"
                )
            tensor, state = decode_tensor(meta, have)
        except (KeyError, ValueError, TypeError, IndexError, RuntimeError) as exc:
            if isinstance(exc, ArtifactError):
                raise
            raise ArtifactError(
                f"{where}: cannot decode tensor {name!r} ({exc!r}); {RECREATE}"
            ) from exc
        art.tensors[name] = tensor
        if state is not None:
            art.states[name] = state
    for alias, target in manifest["aliases"].items():
        if target not in art.tensors:
            raise ArtifactError(
                f"{where}: alias {alias!r} points to unknown tensor {target!r}; {RECREATE}"
            )
        art.tensors[alias] = art.tensors[target]
        if target in art.states:
            art.states[alias] = art.states[target]
    return art


def read_artifact(path: str | Path) -> Artifact:
    """Load the artifact at ``path``: checksums first, then decode every tensor and state."""
    path = Path(path)
    manifest = read_manifest(path)
    blobs = {name: _verified_bytes(path, name, info) for name, info in manifest["files"].items()}
    try:
        parts = st_load(blobs[MODEL_FILE])
    except (SafetensorError, ValueError) as exc:
        raise ArtifactError(
            f"{path / MODEL_FILE} is not a valid safetensors file ({exc}); {RECREATE}"
        ) from exc
    return _decode_all(manifest, parts, path)
