"""OpenVINO and Core ML rows of bench/bench_edge.py (H-OVCM): imported by it, not run alone.

OpenVINO (run in its CPU plugin, batch 1, one thread): ``fp32`` (``openvino.convert_model``,
saved without fp16 compression), ``slimtorch PRESET`` (``export(model, to="openvino")``), and
OpenVINO's own quantizers on the fp32 IR: NNCF weight compression int8 (``INT8_ASYM``, per
channel) and int4 (``INT4_ASYM``, groups of 128, ratio 1.0, all layers; NNCF's ADJUST fallback
picks a smaller group where 128 does not divide a layer: LeNet's 800/500-wide layers), and
NNCF's post-training quantization (``nncf.quantize``: int8 weights and activations, 256 training
images). Latency with the f32 precision hint and no dynamic activation quantization
(``ms_batch1``: what slimtorch's check runs) and with the plugin's defaults (``ms_default``:
bf16 on this CPU, int8 dynamic activations for compressed FullyConnected weights); accuracy and
agreement with the f32 hint.

Core ML (cannot run on Linux): package bytes of ``fp32`` (coremltools' default conversion),
``slimtorch PRESET`` (``export(model, to="coreml")``) and coremltools' own compression of the fp32
program: ``palettize_weights`` k-means 4-bit per tensor and ``linear_quantize_weights`` int8 per
channel / int4 per block of 32 (every conv/linear weight). Quality is the PyTorch model whose
weights are the package's weights as Core ML decodes them (read back from disk): slimtorch's
decode to exactly its model's, coremltools' are decoded and loaded into a copy of the fp32 model.
"""

from __future__ import annotations

import copy
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import slimtorch as st
from slimtorch.export import export

EXTRA_PRESETS = ("int4", "kmeans4")  # besides bench_edge's PRESETS' int8
EXACT = {"INFERENCE_PRECISION_HINT": "f32", "DYNAMIC_QUANTIZATION_GROUP_SIZE": 0}
ONE = {"INFERENCE_NUM_THREADS": 1, "NUM_STREAMS": 1}


def slimtorch_models(case: Any) -> dict[str, nn.Module]:
    """int8 (bench_edge's artifact), int4 and kmeans4 saved and loaded as a user would."""
    models = {"int8": case.compressed["int8"]}
    for preset in EXTRA_PRESETS:
        out = case.tmp / f"{case.key}-ovcm-{preset}"
        if not out.exists():
            st.save(st.compress(copy.deepcopy(case.fp32), preset).model, out)
        models[preset] = st.load(out, trust_factory=True).eval()  # written just above
    return models


def _bytes(path: Path) -> int:
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return path.stat().st_size + (
        path.with_suffix(".bin").stat().st_size if path.suffix == ".xml" else 0
    )


# --------------------------------------------------------------------------------- OpenVINO


def _ms(fn: Any, runs: int = 60) -> tuple[float, float]:
    """Median and fastest milliseconds of ``fn()`` over ``runs`` calls after 3 warm-ups (the
    fastest is the steadier number on a shared machine: time slices quantize the median)."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return round(statistics.median(times), 4), round(min(times), 4)


def _ov_row(variant: str, path: Path, case: Any, reference: nn.Module, scores: Any) -> dict:
    import openvino as ov

    core = ov.Core()
    exact = core.compile_model(str(path), "CPU", {**EXACT, **ONE})
    x = case.images[:1].numpy()
    row: dict[str, Any] = {"variant": variant, "bytes": _bytes(path)}
    row["ms_batch1"], row["ms_fastest"] = _ms(lambda: exact([x]))
    try:
        default = core.compile_model(str(path), "CPU", ONE)
        row["ms_default"], row["ms_default_fastest"] = _ms(lambda: default([x]))
    except RuntimeError as err:  # seen: NNCF's int8 PTQ IR under the bf16 default
        row["ms_default"] = None
        row["default_error"] = str(err).strip().splitlines()[-1][:160]
    row.update(
        scores(lambda t: torch.from_numpy(np.asarray(exact([t.numpy()])[0])), case, reference)
    )
    return row


def openvino_rows(case: Any, scores: Any) -> list[dict[str, Any]]:
    import nncf
    import openvino as ov

    torch.set_num_threads(1)
    example = (case.images[:1],)
    fp32 = case.tmp / f"{case.key}-fp32.xml"
    with torch.no_grad():
        fp32_model = ov.convert_model(case.fp32, example_input=example)
    ov.save_model(fp32_model, str(fp32), compress_to_fp16=False)
    rows = [_ov_row("fp32", fp32, case, case.fp32, scores)]
    for preset, model in slimtorch_models(case).items():
        path = case.tmp / f"{case.key}-{preset}.xml"
        report = export(model, "openvino", path, inputs=example, overwrite=True)
        row = _ov_row(f"slimtorch {preset}", path, case, model, scores)
        row["codes"] = sorted({r["codes"] for r in report["lowbit_layers"]})
        row["dense"] = [d["param"] for d in report["dense_layers"]]
        row["max_abs_diff"] = report["max_abs_diff"]
        rows.append(row)
    modes = {
        "NNCF compress_weights INT8_ASYM": {"mode": nncf.CompressWeightsMode.INT8_ASYM},
        "NNCF compress_weights INT4_ASYM g128": {
            "mode": nncf.CompressWeightsMode.INT4_ASYM, "group_size": 128, "ratio": 1.0,
            "all_layers": True, "advanced_parameters": nncf.AdvancedCompressionParameters(
                group_size_fallback_mode=nncf.GroupSizeFallbackMode.ADJUST),
        },
    }  # fmt: skip
    for variant, kwargs in modes.items():
        path = case.tmp / f"{case.key}-{len(rows)}.xml"
        ov.save_model(nncf.compress_weights(fp32_model.clone(), **kwargs), str(path), False)
        rows.append(_ov_row(variant, path, case, case.fp32, scores))
    calibration = nncf.Dataset(
        [case.calibration[i : i + 1].numpy() for i in range(len(case.calibration))]
    )
    path = case.tmp / f"{case.key}-ptq.xml"
    ov.save_model(nncf.quantize(fp32_model.clone(), calibration), str(path), False)
    rows.append(
        _ov_row(
            "NNCF quantize int8 (weights + activations, 256 images)", path, case, case.fp32, scores
        )
    )
    return rows


# ---------------------------------------------------------------------------------- Core ML


def _decoded_weights(path: Path) -> list[np.ndarray]:
    from slimtorch.export.coreml_read import load_program

    prog = load_program(path)
    return [
        np.asarray(op.materialized_val_inference(), dtype=np.float32)
        for op in prog.functions["main"].operations
        if op.op_type.startswith("constexpr_")
    ]


def _with_weights(fp32: nn.Module, decoded: list[np.ndarray]) -> tuple[nn.Module, int]:
    """A copy of ``fp32`` whose weights are replaced by the decoded ones (each to the parameter of
    the same shape it is closest to); how many were replaced."""
    model = copy.deepcopy(fp32)
    params = {n: p for n, p in model.named_parameters() if p.dim() > 1}
    done = 0
    for w in decoded:
        same = [n for n, p in params.items() if tuple(p.shape) == w.shape]
        if not same:
            continue
        best = min(same, key=lambda n: float(np.abs(params[n].detach().numpy() - w).sum()))
        with torch.no_grad():
            params.pop(best).copy_(torch.from_numpy(w))
        done += 1
    return model, done


def coreml_rows(case: Any, scores: Any) -> list[dict[str, Any]]:
    import coremltools as ct
    import coremltools.optimize.coreml as cto

    from slimtorch.export.coreml import _convert, exported_program

    example = (case.images[:1],)
    ep = exported_program(copy.deepcopy(case.fp32), example)
    fp32 = case.tmp / f"{case.key}-fp32.mlpackage"
    _convert(ct, ep, fold=True).save(str(fp32))
    rows = [{"variant": "fp32", "bytes": _bytes(fp32), **scores(case.fp32, case, case.fp32)}]
    for preset, model in slimtorch_models(case).items():
        path = case.tmp / f"{case.key}-{preset}.mlpackage"
        report = export(model, "coreml", path, inputs=example, overwrite=True)
        row = {
            "variant": f"slimtorch {preset}",
            "bytes": _bytes(path),
            **scores(model, case, model),
        }
        row["decoded_equal"] = report["decoded_equal"]
        row["dense"] = [d["param"] for d in report["dense_layers"]]
        rows.append(row)
    unfolded = _convert(ct, ep)  # BatchNorm kept apart: the decoded weights map back to torch
    own = {
        "coremltools palettize kmeans 4-bit": cto.OpPalettizerConfig(mode="kmeans", nbits=4, weight_threshold=0),
        "coremltools linear_quantize int8 per channel": cto.OpLinearQuantizerConfig(
            mode="linear_symmetric", dtype="int8", granularity="per_channel", weight_threshold=0),
        "coremltools linear_quantize int4 per block 32": cto.OpLinearQuantizerConfig(
            mode="linear", dtype="int4", granularity="per_block", block_size=32, weight_threshold=0),
    }  # fmt: skip
    for variant, op_config in own.items():
        config = cto.OptimizationConfig(op_type_configs={"conv": op_config, "linear": op_config})
        if isinstance(op_config, cto.OpPalettizerConfig):
            compressed = cto.palettize_weights(unfolded, config)
        else:
            compressed = cto.linear_quantize_weights(unfolded, config)
        path = case.tmp / f"{case.key}-{len(rows)}.mlpackage"
        compressed.save(str(path))
        model, replaced = _with_weights(case.fp32, _decoded_weights(path))
        rows.append({"variant": variant, "bytes": _bytes(path), "weights_decoded": replaced,
                     **scores(model, case, case.fp32)})  # fmt: skip
    return rows
