"""Sizes and per-tensor rows of artifacts: bytes on disk, the plain fp32 baseline, inspect rows."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as st_save

from slimtorch.core.errors import ArtifactError
from slimtorch.formats.artifact import RECREATE, find_aliases
from slimtorch.formats.coded import meta_label


def dense_safetensors_bytes(tensors: dict[str, torch.Tensor]) -> int:
    """Exact size of the plain safetensors file of a state_dict with floats cast to float32.

    Tensors sharing storage (tied weights) are counted once, as ``save_model`` would store them.
    """
    aliases = find_aliases(tensors)
    keep = {name: name for name in tensors if name not in aliases}
    for alias, target in aliases.items():  # save_model keeps the alphabetically first name
        keep[target] = min(keep[target], alias)
    plain = {}
    for name, kept in keep.items():
        t = tensors[name].detach().cpu()
        plain[kept] = (t.to(torch.float32) if t.is_floating_point() else t).contiguous().clone()
    canonical = {n: aliases.get(n, n) for n in tensors}
    dropped = {n: keep[c] for n, c in canonical.items() if n != keep[c]}
    return len(st_save(plain, metadata=dropped or None))  # save_model records dropped names


def artifact_bytes(path: str | Path) -> int:
    """Total size in bytes of the files of the artifact at ``path``."""
    path = Path(path)
    if not path.is_dir():
        raise ArtifactError(
            f"no artifact directory at {path}; give the --out directory of `slimtorch compress`"
        )
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _row(name: str, meta: dict[str, Any]) -> dict[str, Any]:
    numel, nonzero, size = int(meta["numel"]), int(meta["nonzero"]), int(meta["bytes"])
    return {
        "name": name,
        "shape": list(meta["shape"]),
        "dtype": meta["dtype"],
        "numel": numel,
        "nonzero": nonzero,
        "sparsity": 1.0 - nonzero / numel if numel else 0.0,
        "bits": size * 8 / numel if numel else 0.0,
        "quant_bits": meta.get("bits"),
        "encoding": meta["encoding"]
        + (f":{meta_label(meta)}" if meta["encoding"] == "coded" else ""),
        "codebook_size": meta.get("codebook_size"),
        "bytes": size,
        "alias_of": None,
    }


def describe(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per tensor: name, shape, dtype, numel, nonzero, sparsity, bits (stored bits per
    element), quant_bits, encoding, bytes, alias_of. Aliased tensors take 0 bytes."""
    rows = []
    for name, meta in manifest.get("tensors", {}).items():
        try:
            rows.append(_row(name, meta))
        except (KeyError, TypeError, ValueError) as exc:
            raise ArtifactError(
                f"manifest entry of tensor {name!r} is malformed ({exc!r}); {RECREATE}"
            ) from exc
    by_name = {r["name"]: r for r in rows}
    for alias, target in manifest.get("aliases", {}).items():
        if target in by_name:
            rows.append(
                {**by_name[target], "name": alias, "bits": 0.0, "bytes": 0, "alias_of": target}
            )
    return rows
