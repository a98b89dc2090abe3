"""Recovery training after low-bit quantization on a real LLM (builtin:smollm2-135m): RTN, GPTQ,
GPTQ + block-wise reconstruction (``quantize.reconstruct``, EfficientQAT Block-AP) and GPTQ +
low-rank adapters (``quantize.lora``: kept as float16 modules, and merged + re-quantized), at
``--bits`` (3 or 2), groups of 64, scored against the base with bench_llm_real's scorer.

    .venv-bench/bin/python bench/bench_llm_recovery.py --bits 3 --work /tmp/recov3 \
        [--rows rtn gptq gptq-recon gptq-lora] [--samples 128] [--recon-samples 64] ...

Calibration: ``--samples`` windows of ``--window`` tokens from builtin:wikipedia's training split
(bench_llm_real's text, tokenizer and token windows); GPTQ sees all of them, the recovery stages
the first ``--recon-samples`` (block reconstruction: ``--recon-steps`` Adam steps per block, one
batch of ``--batch`` windows a step; adapters: ``--lora-steps`` steps of ``--batch`` windows,
KL to the base's logits). Every linear of the decoder blocks is quantized (asymmetric, groups of
64; GPTQ with min-max ranges, activation order, static groups); the tied embedding / LM head is
8-bit per row in every row (the presets' second stage). The recovery rows start from the GPTQ
row's saved artifact and learn from the base (``Run(original=base)``: what ``slimtorch.compress``
gives a recipe ``[quantize.gptq, quantize.reconstruct]``, without running GPTQ twice). Each row
times its own compression/recovery (``seconds``), saves the artifact, reloads it and scores the
reloaded model (KLD to the base, perplexity: 2 x 8 windows x 512 held-out tokens).
Results: ``--out`` (JSON after every row); ``--markdown`` writes the table.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import bench_llm_real as real
import harness

ROWS = ("rtn", "gptq", "gptq-recon", "gptq-lora", "recon")
RESULTS = harness.result_path("llm_recovery.json")


def grid(bits: int) -> dict[str, Any]:
    return {"bits": bits, "symmetric": False, "granularity": "per_group", "group_size": 64}


EMBED = {"method": "quantize.rtn", "bits": 8, "symmetric": True, "granularity": "per_channel",
         "targets": ["Embedding", "lm_head", "embed_out"], "missing": "skip"}  # fmt: skip


def recipes(args: argparse.Namespace) -> dict[str, list[dict[str, Any]]]:
    g = grid(args.bits)
    calib = {"samples": args.samples, "batch_size": 8}
    recon_calib = {"samples": args.recon_samples, "batch_size": args.batch}
    train = {"steps": args.recon_steps, "weight_lr": args.weight_lr, "scale_lr": args.scale_lr}
    return {
        "rtn": [{"method": "quantize.rtn", "signed": False, "targets": ["Linear"],
                 "ignore": ["lm_head"], **g}, EMBED],
        "gptq": [{"method": "quantize.gptq", "observer": "minmax", "act_order": True,
                  "calibration": calib, **g}, EMBED],
        "recon": [{"method": "quantize.reconstruct", "calibration": recon_calib, "train": train,
                   **g}, EMBED],
        "gptq-recon": [{"method": "quantize.reconstruct", "calibration": recon_calib,
                        "train": train}],
        "gptq-lora": [{"method": "quantize.lora", "rank": args.rank, "alpha": args.rank,
                       "train": {"steps": args.lora_steps, "lr": args.lora_lr,
                                 "batch_size": args.batch}}],
    }  # fmt: skip


def apply(model: Any, stages: list[dict[str, Any]], task: Any, original: Any) -> None:
    """The stages applied in order, learning from ``original`` (what compress's Run gives)."""
    from slimtorch.core.context import Context
    from slimtorch.core.methods import Run
    from slimtorch.recipe.recipe import parse_stage

    run = Run(Context(progress=False), task, original=original)
    for i, spec in enumerate(stages):
        stage = parse_stage(spec, i)
        stage.spec.apply(model, stage.config, run)


SUITE = [8, 512]  # windows per text, tokens per window: bench_llm_real's suite (--suite)


def save_and_score(model: Any, path: Path, base: Any) -> dict[str, Any]:
    """Save, reload, and score the reloaded model with bench_llm_real's scorer (the LLM suite
    of ``slimtorch eval``; ``--suite`` windows per text x tokens)."""
    import slimtorch as st
    from slimtorch.core.context import Context
    from slimtorch.workflows.figures import llm_figures

    shutil.rmtree(path, ignore_errors=True)
    st.save(model, path)
    out: dict[str, Any] = {"bytes": real.dir_bytes(path)}
    suite = (SUITE[0], SUITE[1])
    out.update(llm_figures(st.load(path), base, real.MODEL, Context(progress=False), suite))
    out.pop("llm_suite", None)
    return out


def run_row(key: str, args: argparse.Namespace, base: Any, calib: Any) -> list[dict[str, Any]]:
    import copy

    import slimtorch as st
    from slimtorch.core.info import update_info

    stages = recipes(args)
    task = real.fixed_task(calib)
    start = args.work / "gptq"
    if key.startswith("gptq-"):
        if not start.exists():
            raise SystemExit(f"{key} starts from the gptq row's artifact: run --rows gptq first")
        model = st.load(start)
    else:
        model = copy.deepcopy(base)
        update_info(model, architecture=real.load_base().architecture, source=real.MODEL,
                    tokenizer=real.MODEL)  # fmt: skip
    t0 = time.perf_counter()
    apply(model, stages[key], task, base)
    seconds = round(time.perf_counter() - t0, 1)
    rows = [{"key": key, "seconds": seconds, **save_and_score(model, args.work / key, base)}]
    if key == "gptq-lora":
        from slimtorch.quantize.lora import merge_into_grid
        from slimtorch.runtime.lora_lowbit import LoRALinear

        names = [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]
        for name in names:
            merge_into_grid(model, name)
        merged = save_and_score(model, args.work / "gptq-lora-merged", base)
        rows.append({"key": "gptq-lora-merged", "seconds": seconds, **merged})
    return rows


def table(result: dict[str, Any]) -> str:
    header = ["method", "bytes", "perplexity", "KLD mean", "KLD p99", "top-1", "seconds"]
    cells = [["fp base", "", harness_fmt(result.get("base_perplexity"), ".2f"), "0", "0", "1", ""]]
    for r in result["rows"]:
        cells.append([r["key"], harness_fmt(r.get("bytes"), ","),
                      harness_fmt(r.get("perplexity"), ".2f"), harness_fmt(r.get("kld_mean"), ".4f"),
                      harness_fmt(r.get("kld_p99"), ".3f"),
                      harness_fmt(r.get("top1_agreement"), ".3f"),
                      harness_fmt(r.get("seconds"), ".1f")])  # fmt: skip
    return harness.markdown_table(header, cells, "lrrrrrr") + "\n"


def harness_fmt(value: Any, spec: str) -> str:
    return "" if value is None else format(value, spec)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bits", type=int, default=3, choices=[2, 3, 4])
    p.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS[:4]))
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--recon-samples", type=int, default=64)
    p.add_argument("--recon-steps", type=int, default=32)
    p.add_argument("--weight-lr", type=float, default=1e-3)
    p.add_argument("--scale-lr", type=float, default=1e-4)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--lora-steps", type=int, default=48)
    p.add_argument("--lora-lr", type=float, default=5e-4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--suite", type=int, nargs=2, default=SUITE, metavar=("WINDOWS", "TOKENS"))
    p.add_argument("--work", type=Path, default=Path("/tmp/bench-llm-recovery"))
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--markdown", type=Path, default=None)
    args = p.parse_args()
    import torch

    from slimtorch.calibrate.text import TOKEN_WINDOWS

    torch.set_num_threads(args.threads)
    SUITE[:] = args.suite
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.manual_seed(0)
    args.work.mkdir(parents=True, exist_ok=True)
    calib = TOKEN_WINDOWS.get("train")(real.CALIB_TEXT, real.tokenizer_path(), args.samples,
                                       args.window)  # fmt: skip
    base = real.load_base().model.eval()
    result: dict[str, Any] = harness.read_result(args.out, {"rows": []})
    result[f"w{args.bits}"] = dict(command="python " + " ".join(sys.argv), group_size=64,
                  samples=int(calib.shape[0]), window=args.window, threads=args.threads,
                  suite={"windows_per_text": SUITE[0], "tokens": SUITE[1]},
                  budget={"recon": f"{args.recon_steps} steps/block x batch {args.batch} of"
                          f" {args.window} tokens, first {args.recon_samples} windows",
                          "lora": f"rank {args.rank}, {args.lora_steps} steps x batch"
                          f" {args.batch} of {args.window} tokens, lr {args.lora_lr}"},
                  environment=harness.environment())  # fmt: skip
    for key in args.rows:
        for row in run_row(key, args, base, calib):
            result["base_perplexity"] = row.get("baseline_perplexity")
            row["key"] = f"{row['key']}-w{args.bits}"
            result["rows"] = [r for r in result["rows"] if r["key"] != row["key"]] + [row]
            harness.write_result(args.out, result, indent=2)
            print(row, flush=True)
            if args.markdown is not None:
                args.markdown.write_text(table(result))
    print(table(result))


if __name__ == "__main__":
    main()
