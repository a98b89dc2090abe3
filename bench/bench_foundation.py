"""Foundation benchmarks: compress real models with shipped presets, reload the artifact from
disk, and measure bytes on disk, latency and quality against the fp32 original.

    .venv/bin/python bench/bench_foundation.py [--only lenet|lenet5x|minilm|lstm]
                                               [--out bench/results/foundation.json]

Every figure comes from `slimtorch.workflows.compress.compress_to_dir`, the same code path as
`slimtorch compress ... --json`: the artifact is written, loaded back with `slimtorch.load`,
and the loaded model is what is measured.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import harness
from slimtorch.core.context import Context
from slimtorch.workflows.compress import CompressOptions, compress_to_dir

EX = "examples/recipes"
FASHION, AUSTEN = "builtin:fashion-mnist", "builtin:austen"
LENET5, MINILM, LSTM = "builtin:lenet5-fashion", "builtin:minilm", "builtin:char-lstm"


@dataclass(frozen=True)
class Case:
    """One row: ``recipe`` is a preset name or a YAML path; ``data`` trains and evaluates."""

    group: str
    label: str
    model: str
    recipe: str
    data: str | None = None
    batch: int = 1  # latency batch


CASES = [
    Case(
        "lenet", "LeNet-300-100 sparse90-int8", "builtin:lenet300-fashion", "sparse90-int8", FASHION
    ),
    Case("lenet", "LeNet-5 sparse90-int8", LENET5, "sparse90-int8", FASHION),
    Case("lenet5x", "LeNet-5 int4 one-shot (asym, mse)", LENET5, "int4"),
    Case("lenet5x", "LeNet-5 ternary one-shot", LENET5, "ternary"),
    Case("lenet5x", "LeNet-5 binary one-shot", LENET5, "binary"),
    Case("lenet5x", "LeNet-5 QAT int4", LENET5, f"{EX}/qat-int4.yaml", FASHION),
    Case("lenet5x", "LeNet-5 sparse90 + QAT int4", LENET5, f"{EX}/sparse90-qat-int4.yaml", FASHION),
    Case("minilm", "MiniLM int8", MINILM, "int8", batch=32),
    Case("minilm", "MiniLM int4 (g128, asym, mse)", MINILM, "int4", batch=32),
    Case("minilm", "MiniLM 2:4", MINILM, "nm24", batch=32),
    Case("minilm", "MiniLM dynamic-int8", MINILM, "dynamic-int8", batch=32),
    Case("lstm", "char-LSTM int8", LSTM, "int8", batch=32),
    Case("lstm", "char-LSTM int4 (g128, asym, mse)", LSTM, "int4", batch=32),
    Case(
        "lstm", "char-LSTM 50% sparse, gradual", LSTM, f"{EX}/char-lstm-gradual50.yaml", AUSTEN, 32
    ),
    Case(
        "lstm",
        "char-LSTM dense, same fine-tuning (control)",
        LSTM,
        f"{EX}/finetune-only.yaml",
        AUSTEN,
        32,
    ),
]


def run(only: str | None) -> list[dict[str, Any]]:
    rows = []
    for case in CASES:
        if only and case.group != only:
            continue
        with (
            harness.stopwatch() as sw,
            tempfile.TemporaryDirectory(prefix="slimtorch-bench-") as tmp,
        ):
            report = compress_to_dir(
                case.model,
                case.recipe,
                Path(tmp) / "out",
                CompressOptions(data=case.data, latency_batch=case.batch),
                Context(progress=False),
            )
        report["label"] = case.label
        report["wall_s"] = sw.seconds
        rows.append(report)
        keys = (
            "label",
            "value",
            "baseline_value",
            "compression_ratio",
            "latency_ms",
            "baseline_latency_ms",
        )
        print(json.dumps({k: report.get(k) for k in keys}), flush=True)
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    header = ["model / recipe", "metric", "fp32", "compressed", "Δ", "bytes fp32",
              "bytes on disk", "ratio", "latency fp32 ms", "latency loaded ms", "batch"]  # fmt: skip
    cells = []
    for r in rows:
        delta = r["value"] - r["baseline_value"]
        extra = ""
        if "embedding_cosine" in r:
            extra = f" (cos {r['embedding_cosine']:.4f})"
        cells.append(
            [r["label"], r["metric"], f"{r['baseline_value']:.4f}", f"{r['value']:.4f}{extra}",
             f"{delta:+.4f}", f"{r['dense_bytes']:,}", f"{r['bytes_on_disk']:,}",
             f"{r['compression_ratio']:.2f}x", f"{r['baseline_latency_ms']:.3f}",
             f"{r['latency_ms']:.3f}", r["latency_batch"]]
        )  # fmt: skip
    return harness.markdown_table(header, cells)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", choices=["lenet", "lenet5x", "minilm", "lstm"])
    parser.add_argument("--out", default=str(harness.result_path("foundation.json")))
    args = parser.parse_args()
    torch.set_num_threads(2)
    rows = run(args.only)
    env = harness.environment()
    rows = [{**row, "environment": env} for row in rows]  # the file is a list of rows
    out = Path(args.out)
    previous = harness.read_result(out, [])
    keep = [r for r in previous if r["label"] not in {x["label"] for x in rows}]
    harness.write_result(out, keep + rows, default=str)
    print(markdown(rows))


if __name__ == "__main__":
    main()
