"""Edge runtimes: slimtorch's exports against fp32 and against each runtime's own quantizer.

    .venv-bench/bin/python bench/bench_edge.py [--only lenet,resnet] [--runtimes executorch]
        [--samples 2000]

For each builtin model (``lenet5-fashion``, ``resnet18-fashion``; batch 1) and each runtime
section below, rows:

* ``fp32``: the uncompressed model exported dense;
* ``slimtorch PRESET``: the preset applied one-shot (``slimtorch.compress``, no data), then
  ``slimtorch.export.export(model, to=RUNTIME, ...)``, which lowers our own codes;
* ``RUNTIME's own quantizer``: the runtime's quantization flow on the fp32 model (ExecuTorch:
  PT2E ``XNNPACKQuantizer`` static int8 calibrated on 256 training images, PT2E dynamic int8,
  and torchao's 8da4w, ExecuTorch's LLM scheme).

Per row: file bytes, latency (median ms, batch 1, one thread), test accuracy on the first
``--samples`` Fashion-MNIST test images run through the runtime, and the top-1 agreement with
``slimtorch.load``'s model (slimtorch rows) or with the fp32 model (the others). Writes
bench/results/edge.json, merged per (runtime, model, variant).

Sections: each runtime is one function ``rows(case) -> list[dict]`` registered in
:data:`RUNTIMES`; a new runtime adds its function and one entry (H-ET wrote ExecuTorch; the
OpenVINO and Core ML sections go below it).
"""

from __future__ import annotations

import argparse
import copy
import logging
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

import harness
import slimtorch as st
from slimtorch.export import export
from slimtorch.models.registry import load_model

RESULTS = harness.result_path("edge.json")
MODELS = {"lenet": "lenet5-fashion", "resnet": "resnet18-fashion"}
PRESETS = ("int8", "xnnpack-8da4w")  # the shipped presets every runtime gets a row for
CALIBRATION_IMAGES = 256


@dataclass
class Case:
    """One model: its fp32 and compressed versions, the test images, a scratch folder."""

    key: str
    name: str
    fp32: nn.Module
    compressed: dict[str, nn.Module]  # preset -> slimtorch.load-ed artifact
    images: torch.Tensor  # float [N, 1, 28, 28], test
    labels: torch.Tensor
    calibration: torch.Tensor  # float [CALIBRATION_IMAGES, 1, 28, 28], train
    tmp: Path


def _case(key: str, samples: int, tmp: Path) -> Case:
    from slimtorch.zoo.data_images import load_fashion_mnist, to_model_input

    name = MODELS[key]
    fp32 = load_model(f"builtin:{name}").model.eval()
    compressed = {}
    for preset in PRESETS:
        out = tmp / f"{key}-{preset}"
        st.save(st.compress(copy.deepcopy(fp32), preset).model, out)
        compressed[preset] = st.load(out, trust_factory=True).eval()  # written just above
    test_x, test_y = load_fashion_mnist("test")
    train_x, _ = load_fashion_mnist("train")
    return Case(
        key, name, fp32, compressed, to_model_input(test_x[:samples]), test_y[:samples],
        to_model_input(train_x[:CALIBRATION_IMAGES]), tmp,
    )  # fmt: skip


def _scores(
    predict: Callable[[torch.Tensor], torch.Tensor], case: Case, reference: nn.Module
) -> dict[str, float]:
    """Test accuracy of ``predict`` (one image at a time) and its top-1 agreement with
    ``reference`` (PyTorch) on the same images."""
    correct = agree = 0
    with torch.no_grad():
        for i in range(len(case.images)):
            x = case.images[i : i + 1]
            top = int(predict(x).argmax())
            correct += int(top == int(case.labels[i]))
            agree += int(top == int(reference(x).argmax()))
    n = len(case.images)
    return {"accuracy": round(correct / n, 4), "agreement": round(agree / n, 4)}


# ------------------------------------------------------------------------- ExecuTorch (H-ET)


def _et_method(path: Path) -> Any:
    from executorch.runtime import Runtime

    return Runtime.get().load_program(path).load_method("forward")


def _et_row(variant: str, path: Path, case: Case, reference: nn.Module) -> dict[str, Any]:
    from slimtorch.export.onnx.verify import median_ms

    method = _et_method(path)
    x = case.images[:1]
    row: dict[str, Any] = {"variant": variant, "bytes": path.stat().st_size}
    row["ms_batch1"] = round(median_ms(lambda: method.execute([x]), budget_s=3.0), 4)
    row.update(_scores(lambda t: method.execute([t])[0], case, reference))
    return row


def _et_lower(program: Any, example: tuple[torch.Tensor, ...], path: Path) -> Path:
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    ep = torch.export.export(program, example)
    lowered = to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()])
    path.write_bytes(lowered.to_executorch().buffer)
    return path


def _et_pt2e(case: Case, dynamic: bool) -> nn.Module:
    """ExecuTorch's own int8: PT2E with XNNPACKQuantizer, per-channel weights; static
    activations calibrated on training images, or dynamic (Linear layers only)."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    config = get_symmetric_quantization_config(is_per_channel=True, is_dynamic=dynamic)
    quantizer = XNNPACKQuantizer().set_global(config)
    example = case.images[:1]
    graph = torch.export.export(copy.deepcopy(case.fp32), (example,)).module()
    prepared = prepare_pt2e(graph, quantizer)  # type: ignore[arg-type]
    with torch.no_grad():
        for i in range(len(case.calibration)):
            prepared(case.calibration[i : i + 1])
    return convert_pt2e(prepared)


def _et_torchao_8da4w(case: Case) -> nn.Module:
    """ExecuTorch's own 8da4w: torchao's int8 dynamic activation / int4 weight (groups of 32)
    on every Linear whose width the group divides."""
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, quantize_
    from torchao.quantization.granularity import PerGroup

    model = copy.deepcopy(case.fp32)
    config = Int8DynamicActivationIntxWeightConfig(
        weight_dtype=torch.int4, weight_granularity=PerGroup(32)
    )
    quantize_(
        model, config, filter_fn=lambda m, _: isinstance(m, nn.Linear) and m.in_features % 32 == 0
    )
    return model


def executorch_rows(case: Case) -> list[dict[str, Any]]:
    from executorch.extension.pybindings import portable_lib

    portable_lib._unsafe_reset_threadpool(1)
    torch.set_num_threads(1)
    example = (case.images[:1],)
    rows = []
    fp32_path = case.tmp / f"{case.key}-fp32.pte"
    export(case.fp32, "executorch", fp32_path, inputs=example, quantized=False)
    rows.append(_et_row("fp32", fp32_path, case, case.fp32))
    for preset, model in case.compressed.items():
        path = case.tmp / f"{case.key}-{preset}.pte"
        report = export(model, "executorch", path, inputs=example)
        row = _et_row(f"slimtorch {preset}", path, case, model)
        row["scheme"] = report["scheme"]
        row["codes_in_file"] = f"{report['codes_in_file']['found']}/{report['codes_in_file']['of']}"
        row["dense"] = [d["param"] for d in report["dense"]]
        rows.append(row)
    own = {
        "ExecuTorch PT2E int8 static (XNNPACKQuantizer)": lambda: _et_pt2e(case, False),
        "ExecuTorch PT2E int8 dynamic (XNNPACKQuantizer)": lambda: _et_pt2e(case, True),
        "ExecuTorch torchao 8da4w": lambda: _et_torchao_8da4w(case),
    }
    for variant, make in own.items():
        path = case.tmp / f"{case.key}-{len(rows)}.pte"
        _et_lower(make(), example, path)
        rows.append(_et_row(variant, path, case, case.fp32))
    return rows


# ------------------------------------------------------------------------- OpenVINO (H-OVCM)


def openvino_rows(case: Case) -> list[dict[str, Any]]:
    from edge_ovcm import openvino_rows as rows

    return rows(case, _scores)


# ------------------------------------------------------------------------- Core ML (H-OVCM)


def coreml_rows(case: Case) -> list[dict[str, Any]]:
    from edge_ovcm import coreml_rows as rows

    return rows(case, _scores)


RUNTIMES: dict[str, Callable[[Case], list[dict[str, Any]]]] = {
    "executorch": executorch_rows,  # H-ET
    "openvino": openvino_rows,  # H-OVCM
    "coreml": coreml_rows,  # H-OVCM
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", default=",".join(MODELS), help="models: lenet,resnet")
    parser.add_argument("--runtimes", default=",".join(RUNTIMES), help=",".join(RUNTIMES))
    parser.add_argument("--samples", type=int, default=2000, help="test images scored")
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")
    results = harness.read_result(RESULTS, {})
    results.pop("environment", None)
    for key in args.only.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            case = _case(key, args.samples, Path(tmp))
            for runtime in args.runtimes.split(","):
                rows = RUNTIMES[runtime](case)
                for row in rows:
                    row.update(runtime=runtime, model=case.name, samples=args.samples)
                    print(row, flush=True)
                table = results.setdefault(runtime, {}).setdefault(case.name, {})
                table.update({r["variant"]: r for r in rows})
                harness.save_result(
                    RESULTS,
                    results,
                    packages=("executorch", "torchao", "openvino", "nncf", "coremltools"),
                )


if __name__ == "__main__":
    main()
