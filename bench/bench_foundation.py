"""Foundation benchmarks: compress real models with shipped presets, reload the artifact from
disk, and measure bytes on disk, latency and quality against the fp32 original.

    .venv/bin/python bench/bench_foundation.py [--only lenet|lenet5x|minilm|lstm] [--out bench/results/foundation.json]

Every figure comes from `slimtorch.workflow.compress_to_dir`, the same code path as
`slimtorch compress ... --json`: the artifact is written, loaded back with `slimtorch.load`,
and the loaded model is what is measured.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from slimtorch.core.context import Context
from slimtorch.workflow import CompressOptions, compress_to_dir

EXAMPLES = "examples/recipes"
DENSE_FT = {
    "description": "control: the same fine-tuning budget without pruning",
    "stages": [
        {"method": "train.finetune", "train": {"steps": 1200, "lr": 0.001, "batch_size": 64}}
    ],
}

CASES: list[tuple[str, str, str, Any, str | None, int]] = [
    # group, label, model, recipe, data, latency batch
    (
        "lenet",
        "LeNet-300-100 sparse90-int8",
        "builtin:lenet300-fashion",
        "sparse90-int8",
        "builtin:fashion-mnist",
        1,
    ),
    (
        "lenet",
        "LeNet-5 sparse90-int8",
        "builtin:lenet5-fashion",
        "sparse90-int8",
        "builtin:fashion-mnist",
        1,
    ),
    ("lenet5x", "LeNet-5 int4 one-shot (asym, mse)", "builtin:lenet5-fashion", "int4", None, 1),
    ("lenet5x", "LeNet-5 ternary one-shot", "builtin:lenet5-fashion", "ternary", None, 1),
    ("lenet5x", "LeNet-5 binary one-shot", "builtin:lenet5-fashion", "binary", None, 1),
    (
        "lenet5x",
        "LeNet-5 QAT int4",
        "builtin:lenet5-fashion",
        f"{EXAMPLES}/qat-int4.yaml",
        "builtin:fashion-mnist",
        1,
    ),
    (
        "lenet5x",
        "LeNet-5 sparse90 + QAT int4",
        "builtin:lenet5-fashion",
        f"{EXAMPLES}/sparse90-qat-int4.yaml",
        "builtin:fashion-mnist",
        1,
    ),
    ("minilm", "MiniLM int8", "builtin:minilm", "int8", None, 32),
    ("minilm", "MiniLM int4 (g128, asym, mse)", "builtin:minilm", "int4", None, 32),
    ("minilm", "MiniLM 2:4", "builtin:minilm", "nm24", None, 32),
    ("minilm", "MiniLM dynamic-int8", "builtin:minilm", "dynamic-int8", None, 32),
    ("lstm", "char-LSTM int8", "builtin:char-lstm", "int8", None, 32),
    ("lstm", "char-LSTM int4 (g128, asym, mse)", "builtin:char-lstm", "int4", None, 32),
    (
        "lstm",
        "char-LSTM 50% sparse, gradual",
        "builtin:char-lstm",
        f"{EXAMPLES}/char-lstm-gradual50.yaml",
        "builtin:austen",
        32,
    ),
    (
        "lstm",
        "char-LSTM dense, same fine-tuning (control)",
        "builtin:char-lstm",
        DENSE_FT,
        "builtin:austen",
        32,
    ),
]


def run(only: str | None) -> list[dict[str, Any]]:
    rows = []
    for group, label, model, recipe, data, batch in CASES:
        if only and group != only:
            continue
        recipe_arg = recipe
        with tempfile.TemporaryDirectory(prefix="slimtorch-bench-") as tmp:
            if isinstance(recipe, dict):
                import yaml

                recipe_arg = str(Path(tmp) / "recipe.yaml")
                Path(recipe_arg).write_text(yaml.safe_dump(recipe))
            start = time.perf_counter()
            report = compress_to_dir(
                model,
                recipe_arg,
                Path(tmp) / "out",
                CompressOptions(data=data, latency_batch=batch),
                Context(progress=False),
            )
        report["label"] = label
        report["wall_s"] = time.perf_counter() - start
        rows.append(report)
        print(
            json.dumps(
                {
                    k: report.get(k)
                    for k in (
                        "label",
                        "value",
                        "baseline_value",
                        "compression_ratio",
                        "latency_ms",
                        "baseline_latency_ms",
                    )
                }
            ),
            flush=True,
        )
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    head = (
        "| model / recipe | metric | fp32 | compressed | Δ | bytes fp32 | bytes on disk | ratio |"
        " latency fp32 ms | latency loaded ms | batch |\n|---|---|---|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for r in rows:
        delta = r["value"] - r["baseline_value"]
        extra = ""
        if "embedding_cosine" in r:
            extra = f" (cos {r['embedding_cosine']:.4f})"
        lines.append(
            f"| {r['label']} | {r['metric']} | {r['baseline_value']:.4f} | {r['value']:.4f}{extra} |"
            f" {delta:+.4f} | {r['dense_bytes']:,} | {r['bytes_on_disk']:,} |"
            f" {r['compression_ratio']:.2f}x | {r['baseline_latency_ms']:.3f} | {r['latency_ms']:.3f} |"
            f" {r['latency_batch']} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", choices=["lenet", "lenet5x", "minilm", "lstm"])
    parser.add_argument("--out", default="bench/results/foundation.json")
    args = parser.parse_args()
    torch.set_num_threads(2)
    rows = run(args.only)
    out = Path(args.out)
    previous = json.loads(out.read_text()) if out.exists() else []
    keep = [r for r in previous if r["label"] not in {x["label"] for x in rows}]
    out.write_text(json.dumps(keep + rows, indent=1, default=str))
    print(markdown(rows))


if __name__ == "__main__":
    main()
