"""Read what a report shows from a directory: an artifact (``manifest.json``), an automatic
search (``auto.json``, ``trials.jsonl``, ``pareto.json``, ``best/``) and a sensitivity analysis
(``sensitivity.json``). Readers are tolerant of missing optional keys; they never guess numbers.
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimtorch.core.errors import ArtifactError, UserInputError
from slimtorch.formats.artifact import read_manifest
from slimtorch.formats.atomic import MANIFEST_FILE
from slimtorch.formats.sizes import describe

log = logging.getLogger(__name__)

AUTO_FILE = "auto.json"
TRIALS_FILE = "trials.jsonl"
PARETO_FILE = "pareto.json"
SENSITIVITY_FILE = "sensitivity.json"
EVAL_FILE = "eval.json"  # `slimtorch eval DIR --json > DIR/eval.json`
SENSITIVITY_KINDS = ("prune", "bits", "codebook")
_ITEMSIZE = {"float64": 8, "int64": 8, "int32": 4, "int16": 2, "int8": 1, "uint8": 1, "bool": 1}


@dataclass
class LatencyData:
    """Per-leaf-module forward time of a loaded artifact (median over repeats)."""

    forward_ms: float  # plain forward, no hooks
    hooked_ms: float  # forward with the timing hooks (their overhead included)
    batch: int
    repeats: int
    threads: int  # torch intra-op threads during the runs
    rows: list[dict[str, Any]] = field(default_factory=list)  # name, type, calls, ms, share


@dataclass
class ArtifactData:
    path: Path
    summary: dict[str, Any]
    tensors: list[dict[str, Any]]  # describe() rows plus dense_bytes
    layers: list[dict[str, Any]]  # tensors grouped by module: name, tensors, bytes, dense_bytes
    eval: dict[str, Any] | None = None
    latency: LatencyData | None = None
    latency_note: str | None = None


@dataclass
class AutoData:
    path: Path
    meta: dict[str, Any]
    trials: list[dict[str, Any]]
    pareto: list[str]
    best: ArtifactData | None = None


@dataclass
class ReportData:
    path: Path
    artifact: ArtifactData | None = None
    auto: AutoData | None = None
    sensitivity: dict[str, Any] | None = None


def read_json(file: Path) -> Any:
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise ArtifactError(
            f"{file} is not readable JSON ({exc}); re-create it with the slimtorch command that"
            " wrote it"
        ) from exc


def dense_tensor_bytes(row: dict[str, Any]) -> int:
    """Bytes of a tensor in the plain fp32 safetensors baseline (floats as float32)."""
    if row.get("alias_of"):
        return 0
    dtype = str(row.get("dtype", "float32")).removeprefix("torch.")
    return int(row["numel"]) * _ITEMSIZE.get(dtype, 4)


def layer_sizes(tensors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Tensors grouped by their module (``conv1.weight`` -> ``conv1``), biggest dense first."""
    groups: dict[str, dict[str, Any]] = {}
    for row in tensors:
        layer = row["name"].rpartition(".")[0] or row["name"]
        g = groups.setdefault(layer, {"name": layer, "tensors": 0, "bytes": 0, "dense_bytes": 0})
        g["tensors"] += 1
        g["bytes"] += int(row["bytes"])
        g["dense_bytes"] += int(row["dense_bytes"])
    return sorted(groups.values(), key=lambda g: (-g["dense_bytes"], g["name"]))


def _on_disk(path: Path, manifest: dict[str, Any]) -> int:
    """Bytes of the artifact's own files (stray files such as eval.json are not counted)."""
    files = sum(int(info["bytes"]) for info in manifest["files"].values())
    return files + (path / MANIFEST_FILE).stat().st_size


def module_latency_ms(
    model: nn.Module, inputs: Sequence[Any], repeats: int = 20, warmup: int = 3
) -> tuple[float, list[dict[str, Any]]]:
    """Median ms of one forward with timing hooks, and per-leaf-module rows (name, type, calls,
    ms: median over ``repeats`` of the module's summed time in one forward), slowest first."""
    leaves = [(n, m) for n, m in model.named_modules() if n and next(m.children(), None) is None]
    starts: dict[str, list[float]] = defaultdict(list)
    spent: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)

    def hooks(name: str) -> tuple[Any, Any]:
        def pre(_m: nn.Module, _a: Any) -> None:
            starts[name].append(time.perf_counter())

        def post(_m: nn.Module, _a: Any, _o: Any) -> None:
            spent[name] += time.perf_counter() - starts[name].pop()
            calls[name] += 1

        return pre, post

    handles = []
    for name, module in leaves:
        pre, post = hooks(name)
        handles.append(module.register_forward_pre_hook(pre))
        handles.append(module.register_forward_hook(post))
    per_module: dict[str, list[float]] = defaultdict(list)
    totals = []
    model.eval()
    try:
        with torch.inference_mode():
            for i in range(warmup + repeats):
                spent.clear()
                calls.clear()
                begin = time.perf_counter()
                model(*inputs)
                if i >= warmup:
                    totals.append((time.perf_counter() - begin) * 1000.0)
                    for name, _ in leaves:
                        per_module[name].append(spent.get(name, 0.0) * 1000.0)
    finally:
        for h in handles:
            h.remove()
    kinds = dict(leaves)
    total = float(statistics.median(totals))
    rows: list[dict[str, Any]] = []
    for name, values in per_module.items():
        ms = float(statistics.median(values))
        if calls.get(name, 0):
            share = ms / total if total > 0 else 0.0
            row = {"name": name, "type": type(kinds[name]).__name__, "calls": calls[name]}
            rows.append({**row, "ms": ms, "share": share})
    return total, sorted(rows, key=lambda r: -r["ms"])


def artifact_latency(
    path: Path, batch: int = 1, repeats: int = 20, threads: int = 1, **load: Any
) -> LatencyData | str:
    """Latency breakdown of the artifact at ``path`` on ``threads`` torch threads (restored
    afterwards), or a note saying why there is none. ``load``: ``model=`` / ``trust_factory=``
    of :func:`slimtorch.artifact.load.load_artifact`, for an artifact of a Python factory."""
    from slimtorch.artifact.load import load_artifact
    from slimtorch.calibrate.inputs import example_inputs
    from slimtorch.core.info import model_info
    from slimtorch.eval.latency import measure_latency_ms

    model = load_artifact(path, **load)
    inputs = example_inputs(model, batch, model_info(model).architecture)
    if inputs is None:
        return (
            f"no latency breakdown: {path} records no example inputs; re-create it with"
            " `slimtorch compress ... --input-shape 1,3,224,224`"
        )
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        forward = measure_latency_ms(model, inputs, repeats=repeats)
        hooked, rows = module_latency_ms(model, inputs, repeats=repeats)
    finally:
        torch.set_num_threads(before)
    return LatencyData(forward, hooked, batch, repeats, threads, rows)


@dataclass
class LatencyOptions:
    """Whether and how :func:`collect` times the artifacts it finds."""

    enabled: bool = False
    repeats: int = 20
    threads: int = 1
    trust_factory: bool = False  # slimtorch.load(dir, trust_factory=...) for the timed artifacts
    model: Any = None  # slimtorch.load(dir, model=...): an nn.Module or a zero-argument factory


def read_artifact_dir(path: Path, latency: LatencyOptions | None = None) -> ArtifactData:
    """Per-tensor and per-layer sizes of the artifact at ``path``; the latency breakdown too
    when ``latency``; eval numbers when ``path`` holds an ``eval.json``."""
    manifest = read_manifest(path)
    meta = manifest.get("metadata", {}) if isinstance(manifest.get("metadata"), dict) else {}
    tensors = [{**row, "dense_bytes": dense_tensor_bytes(row)} for row in describe(manifest)]
    on_disk = _on_disk(path, manifest)
    dense = meta.get("dense_bytes") or sum(r["dense_bytes"] for r in tensors)
    summary = {
        "dir": str(path),
        "source": meta.get("source"),
        "recipe": meta.get("recipe_name"),
        "architecture": (manifest.get("architecture") or {}).get("kind"),
        "slimtorch_version": manifest.get("slimtorch_version"),
        "bytes_on_disk": on_disk,
        "tensor_bytes": sum(int(r["bytes"]) for r in tensors),
        "dense_bytes": int(dense),
        "compression_ratio": int(dense) / on_disk if on_disk else None,
        "params": sum(int(r["numel"]) for r in tensors if not r.get("alias_of")),
        "nonzero": sum(int(r["nonzero"]) for r in tensors if not r.get("alias_of")),
    }
    data = ArtifactData(path, summary, tensors, layer_sizes(tensors))
    if (path / EVAL_FILE).is_file():
        found = read_json(path / EVAL_FILE)
        data.eval = found if isinstance(found, dict) else None
    if latency is not None and latency.enabled:
        result = artifact_latency(
            path,
            repeats=latency.repeats,
            threads=latency.threads,
            model=latency.model,
            trust_factory=latency.trust_factory,
        )
        if isinstance(result, str):
            data.latency_note = result
        else:
            data.latency = result
    return data


def read_trials(file: Path) -> list[dict[str, Any]]:
    """The trial records of ``trials.jsonl``; unreadable lines are skipped with a warning
    (a search killed mid-write leaves a partial last line)."""
    trials: list[dict[str, Any]] = []
    if not file.is_file():
        return trials
    for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            log.warning("%s line %d is not JSON; skipped", file, number)
            continue
        if isinstance(record, dict):
            trials.append(record)
    return trials


def read_auto_dir(path: Path, latency: LatencyOptions | None = None) -> AutoData:
    meta = read_json(path / AUTO_FILE)
    if not isinstance(meta, dict):
        raise ArtifactError(f"{path / AUTO_FILE} is not a JSON object; re-run the search")
    trials = read_trials(path / TRIALS_FILE)
    pareto: list[str] = []
    if (path / PARETO_FILE).is_file():
        found = read_json(path / PARETO_FILE)
        ids = found.get("ids", []) if isinstance(found, dict) else found
        pareto = [str(i) for i in ids] if isinstance(ids, list) else []
    best = None
    if (path / "best" / MANIFEST_FILE).is_file():
        best = read_artifact_dir(path / "best", latency)
    return AutoData(path, meta, trials, pareto, best)


def read_sensitivity(file: Path) -> dict[str, Any]:
    data = read_json(file)
    if not isinstance(data, dict) or not isinstance(data.get("layers"), list):
        raise ArtifactError(
            f"{file} has no 'layers' list: it is not a slimtorch sensitivity file; re-run"
            " the sensitivity analysis"
        )
    if data.get("kind") not in (None, "slimtorch.sensitivity"):
        log.warning("%s has kind %r; reading it as a sensitivity file", file, data.get("kind"))
    return data


def collect(path: str | Path, latency: LatencyOptions | None = None) -> ReportData:
    """Everything a report of ``path`` shows; raises UserInputError naming the files looked for
    when ``path`` holds none of them."""
    path = Path(path)
    if not path.is_dir():
        raise UserInputError(
            f"{path} is not a directory: give an artifact directory (the --out of `slimtorch"
            " compress`), an automatic-search directory or one holding sensitivity.json"
        )
    if latency is not None and (latency.repeats < 1 or latency.threads < 1):
        raise UserInputError(
            f"latency repeats and threads must be at least 1, got {latency.repeats} and"
            f" {latency.threads}"
        )
    data = ReportData(path)
    if (path / MANIFEST_FILE).is_file():
        data.artifact = read_artifact_dir(path, latency)
    if (path / AUTO_FILE).is_file():
        data.auto = read_auto_dir(path, latency)
    if (path / SENSITIVITY_FILE).is_file():
        data.sensitivity = read_sensitivity(path / SENSITIVITY_FILE)
    if data.artifact is None and data.auto is None and data.sensitivity is None:
        raise UserInputError(
            f"{path} holds nothing to report: looked for {MANIFEST_FILE} (an artifact),"
            f" {AUTO_FILE} (an automatic search) and {SENSITIVITY_FILE} (a sensitivity"
            " analysis); give the directory one of the slimtorch commands wrote"
        )
    return data
