"""Weight sharing against uniform quantization at equal bits on MiniLM (all-MiniLM-L6-v2).

    .venv/bin/python bench/bench_share_minilm.py [--out bench/results/share_minilm.json]

For 8, 6 and 4 bits per weight: the `kmeans8/6/4` presets (one k-means codebook of 2^b values
per layer, linear init, every Linear and the word embeddings) against round-to-nearest uniform
quantization with one scale per output channel (`int8` preset, examples/recipes/uniform6.yaml,
uniform4.yaml), and the `kmeans-huffman` preset. Each artifact is written by
`slimtorch.workflows.compress.compress_to_dir`, loaded back, and measured: Lee Pearson (the evaluator of
builtin:minilm) and the mean cosine between its document embeddings and the fp32 model's, bytes
on disk, and the time `slimtorch.load` takes.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

import torch

import harness
import slimtorch as st
from slimtorch.core.context import Context
from slimtorch.workflows.compress import CompressOptions, compress_to_dir

CASES = [
    ("8", "uniform per-channel", "int8"),
    ("8", "k-means codebook", "kmeans8"),
    ("6", "uniform per-channel", "examples/recipes/uniform6.yaml"),
    ("6", "k-means codebook", "kmeans6"),
    ("4", "uniform per-channel", "examples/recipes/uniform4.yaml"),
    ("4", "k-means codebook", "kmeans4"),
    ("5*", "k-means codebook + Huffman", "kmeans-huffman"),
]


def run(only: str | None = None) -> list[dict[str, Any]]:
    rows = []
    for bits, method, recipe in CASES:
        if only and recipe != only:
            continue
        with tempfile.TemporaryDirectory(prefix="slimtorch-share-") as tmp:
            out = Path(tmp) / "out"
            with harness.stopwatch() as sw:
                report = compress_to_dir(
                    "builtin:minilm",
                    recipe,
                    out,
                    CompressOptions(latency_batch=32),
                    Context(progress=False),
                )
            wall = sw.seconds
            load_s = harness.timed(lambda out=out: st.load(out), 3)[1].fastest / 1000.0
        row = {
            "bits": bits,
            "method": method,
            "recipe": recipe,
            "lee_pearson": report["value"],
            "baseline": report["baseline_value"],
            "embedding_cosine": report.get("embedding_cosine"),
            "bytes_on_disk": report["bytes_on_disk"],
            "dense_bytes": report["dense_bytes"],
            "ratio": report["compression_ratio"],
            "load_seconds": round(load_s, 2),
            "wall_seconds": round(wall, 1),
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    header = ["bits", "method", "recipe", f"Lee Pearson (fp32 {rows[0]['baseline']:.4f})", "Δ",
              "embedding cosine", "bytes on disk", "ratio", "load s"]  # fmt: skip
    cells = [
        [r["bits"], r["method"], f"`{r['recipe']}`", f"{r['lee_pearson']:.4f}",
         f"{r['lee_pearson'] - r['baseline']:+.4f}", f"{r['embedding_cosine']:.4f}",
         f"{r['bytes_on_disk']:,}", f"{r['ratio']:.2f}x", r["load_seconds"]]
        for r in rows
    ]  # fmt: skip
    return harness.markdown_table(header, cells, "lllrrrrrr")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=harness.result_path("share_minilm.json"))
    parser.add_argument("--only", help="run one recipe of the table (e.g. kmeans-huffman)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    rows = run(args.only)
    if args.only:
        args.out = args.out.with_name(f"{args.out.stem}-{Path(args.only).stem}.json")
    env = harness.environment()
    record = {
        "command": "bench/bench_share_minilm.py" + (f" --only {args.only}" if args.only else ""),
        "torch": env["torch"],
        "machine": env["machine"],
        "threads": env["threads"],
        "rows": rows,
        "environment": env,
    }
    harness.write_result(args.out, record)
    print(markdown(rows))


if __name__ == "__main__":
    main()
