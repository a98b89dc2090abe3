"""Compressed models as low-bit ONNX files, against fp32 ONNX and onnxruntime's quantize_dynamic.

    .venv/bin/python bench/bench_onnx.py [--only lenet|resnet|minilm|charlstm]
        [--presets int8,int4] [--decode load|run] [--no-baselines]

For each builtin model (lenet5-fashion, resnet18-fashion, char-lstm, minilm) and each shipped
preset that applies,
the preset is applied one-shot (``slimtorch.compress`` without data: stages that need training
data are skipped), then ``slimtorch.export.onnx.export.export_onnx`` writes the low-bit ONNX file and
checks it in onnxruntime against the PyTorch model. Rows:

* ``fp32``: the uncompressed model exported dense (``quantized=False``);
* ``ort-dynamic``: ``onnxruntime.quantization.quantize_dynamic`` on the fp32 file (its
  defaults: int8 weights per tensor, dynamic uint8 activations, MatMul/Gemm and more);
* one row per preset (a recipe file path is a preset too: the row is named after the file);
  for resnet18-fashion also ``PRESET [BatchNorm folded by the exporter]``: the export before
  slimtorch kept BatchNorm out of the low-bit convolutions (the exporter's folding rewrites
  their weights, which then stay dense float);
  ``--decode run`` rows (``PRESET [decode=run]``) keep the weights low-bit in memory
  (DequantizeLinear / MatMulNBits) instead of decoding them once at load time.

Per row: ONNX bytes (and the slimtorch artifact's bytes), onnxruntime latency (median ms, ``intra_op_num_threads=1``, CPU) at batch 1
and at the model's usual batch, quality: LeNet/ResNet test accuracy on all 10,000 Fashion-MNIST test
images run through onnxruntime; for char-lstm and MiniLM the agreement with the fp32 PyTorch
model on the example inputs (top-1 agreement of next-char logits; cosine of the token
embeddings). Writes bench/results/onnx.json, merged per model and variant (a run with a few
presets replaces only those rows).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

import harness
import slimtorch as st
from slimtorch.api import set_architecture
from slimtorch.export.onnx.export import export_onnx
from slimtorch.export.onnx.verify import _median_ms
from slimtorch.models.registry import builtin_info, load_model

RESULTS = harness.result_path("onnx.json")
MODELS = {
    "lenet": ("lenet5-fashion", 256),
    "resnet": ("resnet18-fashion", 256),
    "charlstm": ("char-lstm", 128),
    "minilm": ("minilm", 1),
}
PRESETS = {
    "lenet": "int8 int4 dynamic-int8 kmeans4 kmeans6 kmeans8 sparse90-int8 deep-compression nm24"
    " structured-50 binary ternary",
    "resnet": "int8 int4 kmeans8",
    "charlstm": "int8 int4 dynamic-int8 kmeans4 kmeans6 kmeans8 sparse90-int8 deep-compression"
    " binary ternary",
    "minilm": "int8 int4 dynamic-int8 kmeans4 kmeans6 kmeans8 w8a8-smoothquant nm24"
    " examples/recipes/minilm-structured50.yaml",
}
PRESETS["charlstm"] += " examples/recipes/charlstm-structured50.yaml"


def _required_data(loaded: Any, preset: str) -> Any:
    """The model's own calibration task for presets that cannot run without data (SmoothQuant,
    GPTQ, ...); None otherwise, so optional fine-tuning stages stay skipped (one-shot rows)."""
    from slimtorch.calibrate.tasks import make_task
    from slimtorch.recipe import load_recipe

    if not load_recipe(preset).needs_data or loaded.task is None:
        return None
    return make_task(loaded.task, None)


def _session(path: str) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def _feeds(session: Any, inputs: tuple[torch.Tensor, ...]) -> dict[str, np.ndarray]:
    """The inputs by the file's names (MiniLM: input_ids, attention_mask, token_type_ids)."""
    names = [i.name for i in session.get_inputs()]
    extra = [torch.zeros_like(inputs[0])] * (len(names) - len(inputs))  # token_type_ids
    return {n: t.numpy() for n, t in zip(names, (*inputs, *extra), strict=True)}


def _latency(path: str, inputs: tuple[torch.Tensor, ...]) -> float:
    session = _session(path)
    feeds = _feeds(session, inputs)
    return round(_median_ms(lambda: session.run(None, feeds), budget_s=3.0), 3)


def _lenet_accuracy(path: str, batch: int) -> float:
    from slimtorch.zoo.data_images import load_fashion_mnist, to_model_input

    images, labels = load_fashion_mnist("test")
    x = to_model_input(images).numpy()
    session = _session(path)
    name = session.get_inputs()[0].name
    correct = 0
    for start in range(0, len(x), batch):
        chunk = x[start : start + batch]
        pad = batch - len(chunk)
        if pad:
            chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), chunk.dtype)])
        logits = session.run(None, {name: chunk})[0][: batch - pad]
        correct += int((logits.argmax(1) == labels[start : start + batch].numpy()).sum())
    return round(correct / len(x), 4)


def _agreement(
    path: str, inputs: tuple[torch.Tensor, ...], reference: np.ndarray, key: str
) -> float:
    session = _session(path)
    out = session.run(None, _feeds(session, inputs))[0].reshape(reference.shape)
    if key == "charlstm":
        return round(float((out.argmax(-1) == reference.argmax(-1)).mean()), 4)
    a, b = out.reshape(-1, out.shape[-1]), reference.reshape(-1, reference.shape[-1])
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)
    return round(float(cos.mean()), 5)


def _quality(
    key: str, path: str, batch: int, inputs: tuple[torch.Tensor, ...], ref: np.ndarray
) -> dict[str, Any]:
    if key in ("lenet", "resnet"):
        return {"accuracy": _lenet_accuracy(path, batch)}
    metric = "top1_agreement" if key == "charlstm" else "cosine_to_fp32"
    return {metric: _agreement(path, inputs, ref, key)}


def _row(
    name: str,
    key: str,
    files: dict[int, str],
    inputs: dict[int, tuple[torch.Tensor, ...]],
    ref: np.ndarray,
    batch: int,
) -> dict[str, Any]:
    row: dict[str, Any] = {"variant": name, "onnx_bytes": Path(files[batch]).stat().st_size}
    for b, path in files.items():
        row[f"ort_ms_batch{b}"] = _latency(path, inputs[b])
    row.update(_quality(key, files[batch], batch, inputs[batch], ref))
    return row


@contextlib.contextmanager
def _exporter_folds_batchnorm() -> Iterator[None]:
    """Export as before slimtorch kept BatchNorm as Mul/Add (the exporter folds it)."""
    from slimtorch.export.onnx import batchnorm

    kept = batchnorm.batchnorm_as_affine
    batchnorm.batchnorm_as_affine = lambda model, copied=False: (model, [])  # type: ignore[assignment]
    try:
        yield
    finally:
        batchnorm.batchnorm_as_affine = kept


def _artifact_bytes(model: torch.nn.Module, tmp: Path) -> int:
    st.save(model, tmp / "artifact")
    size = sum(f.stat().st_size for f in (tmp / "artifact").rglob("*") if f.is_file())
    shutil.rmtree(tmp / "artifact")
    return size


def _export_all(
    model: torch.nn.Module,
    inputs: dict[int, tuple[torch.Tensor, ...]],
    tmp: Path,
    tag: str,
    quantized: bool,
    decode: str = "load",
) -> tuple[dict[int, str], dict[str, Any]]:
    files, report = {}, {}
    for b, x in inputs.items():
        out = tmp / f"{tag}-b{b}.onnx"
        report = export_onnx(model, x, out, quantized=quantized, decode=decode)
        files[b] = str(out)
    return files, report


def _preset_row(
    models: tuple[torch.nn.Module, Any],
    key: str,
    preset: str,
    data: tuple[dict[int, tuple[torch.Tensor, ...]], np.ndarray, int],
    where: tuple[Path, str, str],
) -> dict[str, Any]:
    """One preset's row: compress one-shot, export low-bit, measure."""
    (model, loaded), (inputs, ref, batch), (tmp, decode, suffix) = models, data, where
    suffix += "" if decode == "load" else f" [decode={decode}]"
    name = (Path(preset).stem if preset.endswith(".yaml") else preset) + suffix
    wall = harness.stopwatch()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            compressed = st.compress(model, preset, data=_required_data(loaded, preset)).model
            tag = "".join(c if c.isalnum() else "_" for c in name)
            files, report = _export_all(compressed, inputs, tmp, tag, True, decode)
    except Exception as exc:  # a preset that does not apply is reported, not fatal
        return {"variant": name, "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
    row = _row(name, key, files, inputs, ref, batch)
    ops: dict[str, int] = {}
    for layer in report["lowbit_layers"]:
        ops[layer["op"]] = ops.get(layer["op"], 0) + 1
    row.update(
        artifact_bytes=_artifact_bytes(compressed, tmp),
        decode=decode,
        lowbit_ops=ops,
        dense_layers=len(report["dense_layers"]),
        dense_reasons=sorted({d["reason"].split(" (")[0] for d in report["dense_layers"]}),
        batchnorm_as_mul_add=len(report["batchnorm_as_mul_add"]),
        file_inputs=report["file_inputs"],
        checked_shapes=report["checked_shapes"],
        verified_max_abs_diff=report["max_abs_diff"],
        **(
            {"layer_max_abs_diff": report["layer_max_abs_diff"]}
            if "layer_max_abs_diff" in report
            else {}
        ),
        tolerance=[report["atol"], report["rtol"]],
        dense_float_bytes=report["dense_float_bytes"],
        seconds=round(wall.seconds, 1),
    )
    logging.getLogger("bench").info("%s %s: %s", key, preset, row)
    return row


def bench_model(
    key: str, presets: list[str], baselines: bool = True, decode: str = "load"
) -> dict[str, Any]:
    from onnxruntime.quantization import quantize_dynamic

    name, batch = MODELS[key]
    info = builtin_info(name)
    loaded = load_model(f"builtin:{name}")
    model = loaded.model
    set_architecture(model, loaded.architecture)  # structured pruning needs the example inputs
    batches = sorted({1, batch})
    inputs = {b: tuple(info.example_inputs(b)) for b in batches}
    with torch.inference_mode():
        out = model(*inputs[batch])
    ref = (out.last_hidden_state if hasattr(out, "last_hidden_state") else out).numpy()
    rows = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        if baselines:
            files, _ = _export_all(model, inputs, tmp, "fp32", quantized=False)
            rows.append(_row("fp32", key, files, inputs, ref, batch))
            ort_files = {}
            for b, path in files.items():
                ort_files[b] = str(tmp / f"ortdyn-b{b}.onnx")
                quantize_dynamic(path, ort_files[b])
            rows.append(_row("ort-dynamic (quantize_dynamic)", key, ort_files, inputs, ref, batch))
        for preset in presets:
            variants: list[tuple[str, contextlib.AbstractContextManager[Any]]] = [
                ("", contextlib.nullcontext())
            ]
            if key == "resnet":
                variants.append(
                    (" [BatchNorm folded by the exporter]", _exporter_folds_batchnorm())
                )
            for suffix, patch in variants:
                with patch:
                    rows.append(
                        _preset_row(
                            (model, loaded),
                            key,
                            preset,
                            (inputs, ref, batch),
                            (tmp, decode, suffix),
                        )
                    )
    return {"model": name, "usual_batch": batch, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=sorted(MODELS), action="append")
    parser.add_argument("--presets", help="comma-separated presets (default: all that apply)")
    parser.add_argument(
        "--decode",
        choices=("load", "run"),
        default="load",
        help="export_onnx decode mode ('run' rows are named 'PRESET [decode=run]')",
    )
    parser.add_argument(
        "--no-baselines", action="store_true", help="skip the fp32 and quantize_dynamic rows"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("torch", "onnxscript", "slimtorch"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    results = harness.read_result(RESULTS, {})
    env = harness.environment(["onnxruntime", "onnx", "onnxscript"])
    results["environment"] = {**env, "onnxruntime": env["packages"]["onnxruntime"]}
    for key in args.only or list(MODELS):
        presets = args.presets.split(",") if args.presets else PRESETS[key].split()
        fresh = bench_model(key, presets, not args.no_baselines, args.decode)
        old = results.get(key, {}).get("rows", [])
        names = {r["variant"] for r in fresh["rows"]}
        fresh["rows"] = [r for r in old if r["variant"] not in names] + fresh["rows"]
        results[key] = fresh  # rows merged by variant: a partial run replaces only its rows
        harness.write_result(RESULTS, results, indent=2)
        for row in results[key]["rows"]:
            print(json.dumps(row))


if __name__ == "__main__":
    main()
