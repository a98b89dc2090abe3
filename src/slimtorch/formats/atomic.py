"""Atomic directory writes: build in a hidden sibling, fsync, rename into place.

Used by the artifact writer and the streaming writers: a failure never leaves a half-written
directory nor touches an existing one; replacing needs ``overwrite`` and refuses directories
that are not slimtorch artifacts.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

from slimtorch.core.errors import ArtifactError

MODEL_FILE = "model.safetensors"
MANIFEST_FILE = "manifest.json"


def temp_sibling(path: Path) -> Path:
    """A fresh hidden sibling of ``path`` to build it in (``.NAME.tmp-XXXXXXXXXXXX``)."""
    return path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:12]}"


def temp_siblings(path: Path) -> list[Path]:
    """The build directories :func:`temp_sibling` made for ``path`` that are still there (a
    writer killed before its rename leaves one)."""
    return sorted(path.parent.glob(f".{path.name}.tmp-*"))


def write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """fsync every file directly in ``path`` and then ``path`` itself (before a rename)."""
    for entry in path.iterdir():
        if entry.is_file():
            with open(entry, "rb") as f:
                os.fsync(f.fileno())
    fsync_dir(path)


def check_target(path: Path, overwrite: bool) -> None:
    if not os.path.lexists(path):
        return
    if not path.is_dir():
        raise ArtifactError(
            f"output path {path} exists and is not a directory; choose another path"
        )
    if not overwrite:
        raise ArtifactError(
            f"output directory {path} exists; pass --force / force=True to replace it"
        )
    names = set(os.listdir(path))
    if names and not names & {MANIFEST_FILE, MODEL_FILE}:
        raise ArtifactError(
            f"output directory {path} is not empty and is not a slimtorch artifact; refusing to"
            " replace it even with force: choose another output directory"
        )


def swap_into_place(tmp: Path, path: Path, overwrite: bool) -> None:
    if not os.path.lexists(path):
        os.replace(tmp, path)
    else:
        check_target(path, overwrite)
        old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:12]}"
        os.replace(path, old)
        try:
            os.replace(tmp, path)
        except BaseException:
            os.replace(old, path)
            raise
        if old.is_symlink():
            old.unlink()
        else:
            shutil.rmtree(old, ignore_errors=True)
    fsync_dir(path.parent)
