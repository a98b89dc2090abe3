"""``slimtorch auto --max-bpw / --max-size`` (per-tensor GGUF types from a KL-divergence scan)
against llama.cpp's Q4_K_M and Q4_0 (+ imatrix) at the same bits per weight / file size, on
builtin:smollm2-135m, scored in llama.cpp with bench_llm_real.py's scorer.

    .venv-bench/bin/python bench/bench_auto_llm.py [--rows KEY ...] --work DIR [--llama-only]

Rows (each in its own process):

- ``auto-q4_k_m-bpw``: ``slimtorch auto --max-bpw 6.1654`` (llama.cpp's Q4_K_M on SmolLM2 holds
  6.16547 bits per weight: its 576-wide rows fall back to Q5_0 / Q8_0), the scan's own
  importance weighting the rounding;
- ``auto-q4_k_m-bpw-imatrix``: the same with llama.cpp's imatrix file (the one the llama.cpp
  rows use) weighting the rounding: the type choice is then the only difference;
- ``auto-q4_0-size``: ``--max-size`` of llama.cpp's Q4_0 + imatrix file (91,893,024 bytes);
- ``llama-q4_k_m-imatrix`` / ``llama-q4_0-imatrix``: bench_llm_real.py's rows, re-run here.

The scan (16 windows of 256 tokens of builtin:wikipedia, one forward and backward pass each,
then every (tensor, type) encoded once) is cached in each row's OUT; ``--scan-from DIR`` seeds
an OUT with an earlier scan of the same settings (the rows with the scan's own importance share
one). Results: --out (default bench/results/auto_llm.json).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import bench_llm_real as blr
import harness

RESULTS = harness.result_path("auto_llm.json")
Q4_K_M_BPW = "6.1654"  # llama.cpp Q4_K_M's tensors on SmolLM2: 103,668,480 bytes, 6.16547 bpw
Q4_0_IMATRIX_BYTES = "91893024"  # llama.cpp Q4_0 + imatrix file (bench/results/llm_real.json)
ROWS: dict[str, tuple[str, dict[str, Any]]] = {
    "auto-q4_k_m-bpw": ("slimtorch auto --max-bpw 6.1654", {"max_bpw": Q4_K_M_BPW}),
    "auto-q4_k_m-bpw-imatrix": (
        "slimtorch auto --max-bpw 6.1654 --imatrix (llama.cpp's)",
        {"max_bpw": Q4_K_M_BPW, "imatrix": True},
    ),
    "auto-q4_0-size": (
        "slimtorch auto --max-size 91893024",
        {"max_size": Q4_0_IMATRIX_BYTES},
    ),
    "llama-q4_k_m-imatrix": ("llama.cpp Q4_K_M + imatrix", {}),
    "llama-q4_0-imatrix": ("llama.cpp Q4_0 + imatrix", {}),
}


def run_auto(args: argparse.Namespace, calib: Any, options: dict[str, Any]) -> dict[str, Any]:
    from slimtorch.search.bpw_scan import SCAN_FILES
    from slimtorch.workflows.auto_bpw import BpwJob, auto_bpw

    out = args.work / args.row
    out.mkdir(parents=True, exist_ok=True)
    imatrix = str(blr.imatrix_file(args, calib)) if options.get("imatrix") else None
    if args.scan_from is not None and not (out / "scan.json").exists():  # its Fisher pass
        for name in SCAN_FILES:
            if (args.scan_from / name).exists():
                shutil.copy(args.scan_from / name, out / name)
    job = BpwJob(model=blr.MODEL, out=str(out), max_bpw=options.get("max_bpw"),
                 max_size=options.get("max_size"), imatrix=imatrix,
                 samples=args.scan_samples, tokens=args.scan_tokens)  # fmt: skip
    with harness.stopwatch() as sw:
        report = auto_bpw(job)
    gguf = Path(report["written"]["out"])
    figures: dict[str, Any] = {
        "seconds": round(sw.seconds, 1),
        "bytes": gguf.stat().st_size,
        "bpw": report["bpw"],
        "predicted_kld": report["predicted_kld"],
        "tensors": report["written"]["tensors"],
        "scan": report["scan"],
        "export_llama_cpp_check": report["written"]["llama_cpp"],
    }
    base = blr.load_base().model
    if args.llama_only:
        figures.update(kld_mean=None, perplexity=None, top1_agreement=None)
    else:
        from slimtorch.models.registry import load_model

        figures.update(blr.score(load_model(str(gguf)).model, base))
    figures.update(blr.llama_cpp_figures(gguf, base, args.llama_threads))
    return figures


def run_row(args: argparse.Namespace) -> None:
    import torch
    from safetensors.torch import load_file

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    calib = load_file(str(args.work / "calib.safetensors"))["input_ids"]
    label, options = ROWS[args.row]
    if args.row.startswith("llama-"):
        figures = blr.run_llama(blr.ROWS[args.row], args, calib)
    else:
        figures = run_auto(args, calib, options)
    print("RESULT " + json.dumps({"key": args.row, "impl": "slimtorch", "label": label,
                                  **figures}), flush=True)  # fmt: skip


def speed(paths: list[Path], threads: int, rounds: int) -> dict[str, float]:
    """llama.cpp decode tokens/s of each GGUF file (bench_llm_real.py's protocol: a 64-token
    prompt of fixed ids, 128 greedy tokens, prefill excluded), the files interleaved over
    ``rounds`` rounds in one process so that machine load hits them alike; the median."""
    import time

    import numpy as np
    from llama_cpp import Llama

    from slimtorch.eval.decode import random_prompt

    prompt = random_prompt(49152, blr.PROMPT_TOKENS)[0].tolist()
    models = {str(p): Llama(str(p), n_ctx=blr.PROMPT_TOKENS + blr.NEW_TOKENS + 8,
                            n_threads=threads, verbose=False) for p in paths}  # fmt: skip
    rates: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(rounds):
        for key, llm in models.items():
            llm.reset()
            llm.eval(prompt)
            start = time.perf_counter()
            for _ in range(blr.NEW_TOKENS):
                llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
            rates[key].append(blr.NEW_TOKENS / (time.perf_counter() - start))
    return {k: float(np.median(v)) for k, v in rates.items()}


def table(result: dict[str, Any]) -> str:
    header = ["row", "bytes", "bpw", "predicted KLD", "llama.cpp KLD", "top-1", "ppl", "tok/s"]
    cells = [
        [r["label"], blr.fmt(r.get("bytes"), ","), blr.fmt(r.get("bpw"), ".4f"),
         blr.fmt(r.get("predicted_kld"), ".4f"), blr.fmt(r.get("llama_cpp_kld_mean"), ".4f"),
         blr.fmt(r.get("llama_cpp_top1_agreement"), ".3f"),
         blr.fmt(r.get("llama_cpp_perplexity"), ".2f"),
         blr.fmt(r.get("llama_cpp_tokens_per_s"), ".1f")]
        for r in result["rows"]
    ]  # fmt: skip
    return harness.markdown_table(header, cells, "lrrrrrrr") + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS))
    parser.add_argument("--row", choices=list(ROWS), help=argparse.SUPPRESS)
    parser.add_argument("--samples", type=int, default=64, help="imatrix calibration windows")
    parser.add_argument("--scan-samples", type=int, default=16)
    parser.add_argument("--scan-tokens", type=int, default=256)
    parser.add_argument("--scan-from", type=Path, default=None, help="an OUT holding a scan")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--llama-threads", type=int, default=1)
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench-auto-llm"))
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--markdown", type=Path, default=None)
    parser.add_argument("--llama-only", action="store_true", help="score in llama.cpp only")
    parser.add_argument("--speed", nargs="+", type=Path, help="only: tokens/s of these GGUFs")
    parser.add_argument("--rounds", type=int, default=5, help="--speed rounds")
    args = parser.parse_args()
    if args.speed:
        print(json.dumps(speed(args.speed, args.llama_threads, args.rounds), indent=1))
        return
    if args.row is not None:
        run_row(args)
        return
    from safetensors.torch import save_file

    args.work.mkdir(parents=True, exist_ok=True)
    calib = blr.make_calibration(args.samples)
    save_file({"input_ids": calib.contiguous()}, str(args.work / "calib.safetensors"))
    result: dict[str, Any] = harness.read_result(args.out, {"rows": []})
    result.update(
        command="python " + " ".join(sys.argv), samples=int(calib.shape[0]),
        threads=args.threads, llama_threads=args.llama_threads,
        environment=harness.environment(packages=("gguf", "llama_cpp_python")),
    )  # fmt: skip
    for key in args.rows:
        cmd = [
            sys.executable,
            __file__,
            "--row",
            key,
            "--work",
            str(args.work),
            "--threads",
            str(args.threads),
            "--llama-threads",
            str(args.llama_threads),
            "--scan-samples",
            str(args.scan_samples),
            "--scan-tokens",
            str(args.scan_tokens),
        ]
        cmd += ["--llama-only"] if args.llama_only else []
        cmd += ["--scan-from", str(args.scan_from)] if args.scan_from else []  # fmt: skip
        row = blr.child_row(cmd, key, ROWS[key][0], "slimtorch", args.work)
        blr.add_row(result, row, list(ROWS), args.out, args.markdown, table)
    print(table(result))


if __name__ == "__main__":
    main()
