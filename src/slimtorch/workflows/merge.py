"""Merge models from a mergekit-style YAML config (``slimtorch merge CONFIG --out DIR``)."""

from __future__ import annotations

import resource
import sys
import time
from pathlib import Path
from typing import Any

from slimtorch.core.errors import ConfigError
from slimtorch.merge import load_config, merge_to_dir


def _peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def merge_from_config(
    config: str | Path, out: str | Path, force: bool = False, seed: int = 0
) -> dict[str, Any]:
    """Merge the models ``config`` names (paths relative to its directory) into ``out``;
    JSON-able facts about the merge, with its time and this process's peak memory."""
    path = Path(config)
    parsed = load_config(path)
    start = time.perf_counter()
    report = merge_to_dir(parsed, out, force, seed, path.resolve().parent)
    report["seconds"] = round(time.perf_counter() - start, 3)
    report["peak_rss_mb"] = round(_peak_rss_mb(), 1)
    return report


def extract_lora_to_dir(
    base: str,
    model: str,
    out: str | Path,
    max_rank: int = 128,
    distribute_scale: bool = True,
    sv_epsilon: float = 0.0,
    force: bool = False,
) -> dict[str, Any]:
    """The PEFT adapter that turns ``base`` into (about) the fine-tune ``model``, written to
    ``out`` (``slimtorch extract-lora``, mergekit-extract-lora's maths and layout), with the
    adapter's size next to the fine-tune's."""
    from slimtorch.merge.lora import extract_lora

    if max_rank < 1:
        raise ConfigError(f"--max-rank must be at least 1, got {max_rank}")
    if sv_epsilon < 0:
        raise ConfigError(f"--sv-epsilon must be 0 or more, got {sv_epsilon}")
    start = time.perf_counter()
    report = extract_lora(base, model, out, max_rank, distribute_scale, sv_epsilon, force)
    report["adapter_bytes"] = sum(p.stat().st_size for p in Path(out).iterdir())
    report["model_bytes"] = _tensor_bytes(Path(model))
    report["seconds"] = round(time.perf_counter() - start, 3)
    report.update(base_model=base, model=model)
    return report


def _tensor_bytes(path: Path) -> int | None:
    """Bytes of a Hugging Face directory's safetensors files (None for anything else)."""
    files = list(path.glob("*.safetensors")) if path.is_dir() else []
    return sum(f.stat().st_size for f in files) or None
