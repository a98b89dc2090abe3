"""The measurements a search starts from, each cached in OUT so a resumed search reuses them:
the baseline (``baseline.json``), the size table (``sizes.json``) and the predicted quality cost
of every layer choice (``sensitivity.json`` when a scan ran, else the weight-error proxy)."""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from slimtorch.core.errors import ConfigError, TargetError
from slimtorch.core.info import model_info
from slimtorch.formats.sizes import artifact_bytes, dense_safetensors_bytes
from slimtorch.graph.weights import WeightRef, select_weights
from slimtorch.models.registry import LoadedModel
from slimtorch.search import outdir
from slimtorch.search.allocate import Costs
from slimtorch.search.sensitivity_table import Sensitivity
from slimtorch.search.sizing import build_size_model
from slimtorch.search.space import Choice, SizeModel, choice, choice_key, parse_choice_key
from slimtorch.search.trials import _loaded, prepared_model

log = logging.getLogger(__name__)
LARGE = 5_000_000  # parameters above which the default grid is smaller
LARGE_GRID = ((0.0, 0.5), (("int", 8), ("int", 6), ("int", 4)))


@dataclass
class Baseline:
    quality: float
    bytes: int
    latency_ms: float | None
    dense_bytes: int
    metric: str
    higher_is_better: bool


def base_spec(model: str, options: Any) -> dict[str, Any]:
    return {
        "model": model,
        "eval_data": options.extra.get("eval_data"),
        "input": options.input,
        "runtime": options.runtime,
        "latency_batch": options.latency_batch,
    }


def _measure(model: str, out: Path, options: Any) -> Baseline:
    from slimtorch import api
    from slimtorch.search.trials import _onnx_latency

    spec = base_spec(model, options)
    m = prepared_model(spec)
    threads = torch.get_num_threads()
    torch.set_num_threads(options.threads)
    try:
        measured = api.evaluate(m, latency_batch=options.latency_batch)
        latency = measured.get("latency_ms")
        if options.runtime == "onnx":
            inputs = api.example_inputs_for(
                m, model_info(m).architecture or {}, options.latency_batch
            )
            latency = _onnx_latency(m, inputs, out / ".baseline.onnx")
    finally:
        torch.set_num_threads(threads)
    tmp = out / ".baseline-artifact"
    try:
        api.save(m, tmp, force=True)
        size = artifact_bytes(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if measured.get("value") is None:
        raise ConfigError(f"{model} gave no quality value; give a model slimtorch can evaluate")
    return Baseline(
        float(measured["value"]),
        size,
        latency,
        dense_safetensors_bytes(m.state_dict()),
        str(measured["metric"]),
        bool(measured["higher_is_better"]),
    )


def measure_baseline(model: str, out: Path, options: Any) -> tuple[Baseline, LoadedModel]:
    """The uncompressed model's quality, bytes and latency (from OUT/baseline.json on resume)."""
    loaded = _loaded(model)
    if loaded.evaluator is None:
        raise ConfigError(
            f"slimtorch knows no quality metric for {model}: auto needs a builtin model or a"
            " Hugging Face directory it can evaluate (see `slimtorch models`)"
        )
    data = options.data
    options.extra["eval_data"] = (data if loaded.evaluates_training_data else None) or loaded.data
    cached = outdir.read_json(out / "baseline.json")
    if cached and cached.get("model") == model and cached.get("runtime") == options.runtime:
        return Baseline(**cached["baseline"]), loaded
    base = _measure(model, out, options)
    outdir.write_json(
        out / "baseline.json",
        {"model": model, "runtime": options.runtime, "baseline": asdict(base)},
    )
    return base, loaded


def search_layers(model: torch.nn.Module) -> dict[str, list[WeightRef]]:
    """Layers the search assigns choices to: every scanned layer type plus embeddings."""
    from slimtorch.search.sensitivity import scan_layers

    names = scan_layers(model)
    names += [n for n, m in model.named_modules() if isinstance(m, torch.nn.Embedding)]
    return {name: select_weights(model, [name]) for name in dict.fromkeys(names)}


def grid_for(model: torch.nn.Module, options: Any) -> list[Choice]:
    params = sum(p.numel() for p in model.parameters())
    prunes, quants = options.prune, options.quant
    if prunes is None or quants is None:
        big = params > LARGE
        prunes = prunes or (LARGE_GRID[0] if big else (0.0, 0.5, 0.7, 0.8, 0.9, 0.95))
        quants = quants or (
            LARGE_GRID[1]
            if big
            else (None, ("int", 8), ("int", 4), ("codebook", 5), ("codebook", 4))
        )
    return [choice(p, *(q or (None,))) for p in prunes for q in quants]


def size_model(loaded: LoadedModel, out: Path, options: Any, base: Baseline) -> SizeModel:
    """The per-layer size table (OUT/sizes.json, rebuilt when the grid or coding changed)."""
    grid = grid_for(loaded.model, options)
    key = {"grid": [choice_key(c) for c in grid], "entropy": options.entropy}
    cached = outdir.read_json(out / "sizes.json")
    if cached and cached.get("key") == key:
        return SizeModel.from_dict(cached["model"])
    start = time.perf_counter()
    layers = search_layers(loaded.model)
    sizes = build_size_model(loaded.model, layers, grid, base.bytes, options.entropy, options.seed)
    log.info(
        "size table: %d layers x %d choices in %.1fs",
        len(layers),
        len(grid),
        time.perf_counter() - start,
    )
    outdir.write_json(out / "sizes.json", {"key": key, "model": sizes.to_dict()})
    return sizes


def _grid_values(sizes: SizeModel) -> dict[str, list[float]]:
    values: dict[str, set[float]] = {"prune": set(), "bits": set(), "codebook": set()}
    for key in next(iter(sizes.table.values())):
        c = parse_choice_key(key)
        if c["prune"] > 0:
            values["prune"].add(c["prune"])
        if c["quant"] is not None:
            values["bits" if c["quant"]["kind"] == "int" else "codebook"].add(c["quant"]["bits"])
    return {k: sorted(v) for k, v in values.items()}


def _scan(loaded: LoadedModel, out: Path, options: Any, sizes: SizeModel) -> Sensitivity | None:
    """A sensitivity scan (OUT/sensitivity.json), or None when it is off or too slow."""
    from slimtorch.search.sensitivity import scan
    from slimtorch.search.sensitivity_eval import task_evaluator

    path = out / "sensitivity.json"
    if path.is_file():
        return Sensitivity.load(path)
    if options.scan == "off":
        return None
    evaluate, metric, hib = task_evaluator(loaded, options.data, split="calibration")
    model = prepared_model(base_spec(loaded.source, options))
    evaluate(model)  # loads the data once
    start = time.perf_counter()
    evaluate(model)
    values = _grid_values(sizes)
    n = len(sizes.table) * sum(len(v) for v in values.values())
    estimate = (time.perf_counter() - start) * (n + 1)
    if options.scan == "auto" and estimate > options.scan_budget_s:
        log.info(
            "sensitivity scan skipped: %d evaluations, about %.0fs > scan budget %.0fs; using the"
            " weight-error proxy",
            n,
            estimate,
            options.scan_budget_s,
        )
        return None
    sens = scan(
        model,
        evaluate,
        higher_is_better=hib,
        layers=list(sizes.table),
        prune=values["prune"],
        bits=values["bits"],
        codebook=values["codebook"],
        progress=False,
        metric=metric,
        model_name=loaded.source,
    )
    sens.save(path)
    return sens


def _predicted_drop(sens: Sensitivity | None, layer: str, c: Choice, error: float) -> float:
    """Sum of the scanned drops of the pruning and the quantizer (clamped at 0), plus a small
    weight-error term that breaks ties; the error alone without a scan."""
    if sens is None:
        return error
    try:
        drop = max(0.0, sens.drop(layer, "prune", c["prune"])) if c["prune"] > 0 else 0.0
        q = c["quant"]
        if q is not None:
            kind = "bits" if q["kind"] == "int" else "codebook"
            drop += max(0.0, sens.drop(layer, kind, q["bits"]))
    except (ConfigError, TargetError):
        return error
    return drop + 1e-3 * error


def scan_or_proxy(loaded: LoadedModel, out: Path, options: Any, sizes: SizeModel) -> Costs:
    """``costs[layer][choice] = (bytes, predicted drop)`` for the allocation."""
    sens = _scan(loaded, out, options, sizes)
    return {
        layer: {
            key: (b, _predicted_drop(sens, layer, parse_choice_key(key), sizes.error[layer][key]))
            for key, b in table.items()
        }
        for layer, table in sizes.table.items()
    }
