"""LoRA extraction: a fine-tuned model as its base plus low-rank adapters (mergekit-extract-lora).

For every 2-D ``*.weight`` of the fine-tune outside the embeddings, the delta ``tuned - base`` is
factored by a truncated SVD in float32: ``delta ~= B @ A`` with ``A = sqrt(S_r) Vh_r`` and
``B = U_r sqrt(S_r)`` (``distribute_scale``; otherwise ``A = S_r Vh_r``, ``B = U_r``), ``r`` the
``rank`` (capped by the matrix, and by the singular values above ``sv_epsilon``), A and B stored in
the delta's dtype. A Linear's bias delta becomes ``lora_B.bias``. Embeddings, LM heads and every
tensor that is not a matrix (norms) are saved whole (PEFT's ``modules_to_save``). The output is a
PEFT adapter directory: ``adapter_model.safetensors`` (mergekit's tensor names,
``base_model.model.<module>.lora_A.weight``) and ``adapter_config.json`` (``r`` = the largest rank
used, ``lora_alpha = r`` so that the scale is 1, ``rank_pattern``/``alpha_pattern`` for the others).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from slimtorch.core.errors import ConfigError
from slimtorch.formats.atomic import fsync_tree, temp_sibling
from slimtorch.merge.stream import open_source

_FULL = ("embed", "wte", "wpe", "lm_head", "word_embeddings", "shared")


def lora_factors(
    delta: torch.Tensor, rank: int, distribute_scale: bool = True, sv_epsilon: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` with ``B @ A`` the best rank-``rank`` approximation of the matrix ``delta``."""
    if delta.dim() != 2:
        raise ValueError(f"LoRA factors a matrix, got shape {tuple(delta.shape)}")
    if rank < 1:
        raise ValueError(f"rank must be at least 1, got {rank}")
    u, s, vh = torch.linalg.svd(delta.to(dtype=torch.float32), full_matrices=False)
    r = min(rank, s.shape[0])
    if sv_epsilon > 0:
        r = min(int((s > sv_epsilon).sum().item()), r)
    if distribute_scale:
        scale_a = scale_b = torch.diag(torch.sqrt(s[:r]))
    else:
        scale_a, scale_b = torch.diag(s[:r]), torch.eye(r)
    return (scale_a @ vh[:r]).to(delta.dtype), (u[:, :r] @ scale_b).to(delta.dtype)


def _kind(name: str, shape: tuple[int, ...]) -> str:
    """``lora``, ``bias`` (of a LoRA module, decided by the caller) or ``full``."""
    module = name.rsplit(".", 1)[0]
    if any(h in module for h in _FULL) or not name.endswith(".weight") or len(shape) != 2:
        return "full"
    return "lora"


def extract_lora(
    base: str,
    tuned: str,
    out: str | Path,
    rank: int = 32,
    distribute_scale: bool = True,
    sv_epsilon: float = 0.0,
    force: bool = False,
) -> dict[str, Any]:
    """Write the PEFT adapter that turns ``base`` into (about) ``tuned``; facts about it.
    The directory appears whole or not at all; ``force`` replaces an earlier adapter there."""
    out = Path(out)
    _check_out(out, force)
    b, t = open_source(base), open_source(tuned)
    try:
        if set(b.infos) != set(t.infos):
            raise ConfigError(
                f"{base} and {tuned} hold different tensors; extract from a fine-tune"
            )
        tensors: dict[str, torch.Tensor] = {}
        ranks: dict[str, int] = {}
        full: set[str] = set()
        lora_modules = {n.rsplit(".", 1)[0] for n in t.infos if _kind(n, t.infos[n][0]) == "lora"}
        for name in t.infos:
            module, leaf = name.rsplit(".", 1) if "." in name else ("", name)
            if module in lora_modules and leaf == "weight":
                a, bb = lora_factors(
                    t.read(name) - b.read(name), rank, distribute_scale, sv_epsilon
                )
                tensors[f"base_model.model.{module}.lora_A.weight"] = a.contiguous()
                tensors[f"base_model.model.{module}.lora_B.weight"] = bb.contiguous()
                ranks[module] = a.shape[0]
            elif module in lora_modules and leaf == "bias":
                tensors[f"base_model.model.{module}.lora_B.bias"] = t.read(name) - b.read(name)
            else:
                tensors[f"base_model.model.{name}"] = t.read(name).contiguous()
                full.add(module.rsplit(".", 1)[-1] if module else name)
    finally:
        b.close()
        t.close()
    r = max(ranks.values(), default=rank)
    different = {k: v for k, v in ranks.items() if v != r}
    config = {
        "base_model_name_or_path": base, "peft_type": "LORA", "use_rslora": False,
        "target_modules": sorted({m.rsplit(".", 1)[-1] for m in ranks}),
        "modules_to_save": sorted(full), "task_type": "CAUSAL_LM", "r": r, "lora_alpha": r,
        "rank_pattern": different, "alpha_pattern": different, "lora_dropout": 0.0,
        "fan_in_fan_out": False, "inference_mode": True,
    }  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(out)
    try:
        tmp.mkdir()
        save_file(tensors, str(tmp / "adapter_model.safetensors"))
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
        fsync_tree(tmp)
        if out.exists():
            shutil.rmtree(out)  # an adapter (checked above): replaced only with force
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"out": str(out), "rank": r, "lora_modules": len(ranks), "full_tensors": len(full)}


_ADAPTER = {"adapter_model.safetensors", "adapter_config.json"}


def _check_out(out: Path, force: bool) -> None:
    """``out`` may be new, an empty directory, or (with ``force``) an earlier adapter."""
    if not out.exists():
        return
    if not out.is_dir():
        raise ConfigError(f"{out} exists and is not a directory; choose a new directory")
    names = {p.name for p in out.iterdir()}
    if not names:
        return
    if not force:
        raise ConfigError(f"{out} exists and is not empty; choose a new directory or --force")
    if not names <= _ADAPTER:
        raise ConfigError(
            f"{out} holds files that are not a LoRA adapter ({sorted(names - _ADAPTER)[:3]});"
            " refusing to replace it even with --force: choose a new directory"
        )
