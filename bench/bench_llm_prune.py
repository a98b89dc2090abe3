"""Depth pruning of a real LLM: builtin:smollm2-135m (30 decoder blocks) with `prune.layers`.

    .venv-bench/bin/python bench/bench_llm_prune.py [--drops 3 6 9] [--samples 16]
        [--kld-samples 0] [--recover 6] [--recover-steps 100] [--gguf]
        [--width 0.1335 0.2669] [--width-importance activation] [--width-batches 1]
        [--decode-cpu] [--work /tmp/llm_prune] [--out bench/results/llm_prune.json]

Blocks are ranked once on the base model by block influence (ShortGPT: 1 - cosine between a
block's input and output hidden states) over ``--samples`` random 256-token windows of the train
split of builtin:wikipedia + builtin:austen (the `causal-lm` task under the model's tokenizer);
with ``--kld-samples N`` also by the measured next-token KLD of dropping each block alone, on N
windows (31 forward passes each). Each row drops the ``--drops`` lowest-influence blocks with
`prune.layers` and is scored with bench_llm_real.py's scorer (perplexity and KLD to the base
on 8 x 512 held-out tokens of wikipedia and austen each), decoding speed (`eval.decode`: greedy,
batch 1, KV cache, 128 tokens after a 64-token prompt, prefill excluded; and per CPU-second,
which a loaded shared machine does not skew: :func:`cpu_tokens_per_s`), the parameter count,
and a save/load round trip (max |logit difference| on one window). ``--gguf`` also exports each
row with `export --to gguf` (float weights) and measures llama.cpp's tokens/s and KLD on it.

Recovery (``--recover N``): the recipe [prune.layers (the same blocks), distill.finetune] on
the base, so the teacher is the unpruned model: logit distillation (KL at temperature 2, alpha
0.5 with the LM loss) on random 128-token windows of wikipedia + austen: ``--recover-steps``
Adam steps of ``--recover-batch`` windows at ``--recover-lr`` (cosine), one thread; its wall time
is reported.
Width pruning (``--width R``, rows ``width-mlp-R``; ``width-mlp-R-l2`` with l2 importance):
`prune.structured` on the base removing ``ratio: R`` of every block's MLP intermediate channels
(targets: the gate/up projections; ``heads: false``, so attention heads and the 576-wide
residual stream are kept), ranked by ``--width-importance`` (``activation``: mean |output| of
gate_proj and up_proj over ``--width-batches`` batches of 32 random 256-token windows of the
same text). Removing k of the 1,536 channels in all 30 blocks removes 30 x 3 x 576 x k
parameters: k = 205 (R = 205/1536) and 410 (R = 410/1536) match dropping 3 and 6 blocks
(10% / 20%) within 0.01%. ``--decode-cpu``: after the rows, new tokens per CPU-second of the
base, every width row and the ``--drops`` depth rows, measured interleaved in one process
(``decode_cpu_width``), since separate runs see different machine load.
One thread (OMP_NUM_THREADS=1). Results after every row: ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from pathlib import Path
from typing import Any

import harness

MODEL = "builtin:smollm2-135m"
TEXT = "builtin:wikipedia+builtin:austen"
RESULTS = harness.result_path("llm_prune.json")


def _params(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())


def _task(window: int) -> Any:
    from slimtorch.calibrate.lm import CausalLMTask
    from slimtorch.zoo.tasks import lm_train_ids

    return CausalLMTask(lm_train_ids(TEXT, MODEL), window=window)


def _scores(base: Any, task: Any, criterion: str, samples: int) -> dict[str, Any]:
    from slimtorch.core.context import Context
    from slimtorch.core.methods import Run
    from slimtorch.prune.stages.layers import LayersConfig, block_list, block_scores

    config = LayersConfig.model_validate(
        {"count": 1, "criterion": criterion, "calibration": {"samples": samples, "batch_size": 4}}
    )
    _, blocks = block_list(base, None)
    start = time.perf_counter()
    scores = block_scores(base, blocks, config, Run(Context(progress=False), task))
    return {"scores": scores, "seconds": time.perf_counter() - start, "samples": samples}


def _reload_diff(model: Any, work: Path, name: str) -> float:
    import shutil

    import torch

    import slimtorch as st

    path = work / f"{name}.artifact"
    shutil.rmtree(path, ignore_errors=True)
    st.save(model, path)
    loaded = st.load(path)
    ids = torch.arange(64)[None] * 7 % 49152
    with torch.no_grad():
        diff = (loaded(ids).logits - model.eval()(ids).logits).abs().max()
    shutil.rmtree(path, ignore_errors=True)
    return float(diff)


def _gguf(model: Any, base: Any, work: Path, name: str) -> dict[str, Any]:
    import torch

    from bench_llm_real import llama_cpp_figures
    from slimtorch.export.gguf import export_gguf

    path = work / f"{name}.gguf"
    path.unlink(missing_ok=True)
    start = time.perf_counter()
    try:
        export_gguf(model, (torch.arange(32)[None] * 11 % 49152,), path, overwrite=True)
    except Exception as exc:  # a bench row records the failure
        return {"gguf_error": f"{type(exc).__name__}: {exc}"[:300]}
    out = {"gguf_bytes": path.stat().st_size, "gguf_export_s": time.perf_counter() - start}
    out.update(llama_cpp_figures(path, base, threads=1))
    path.unlink(missing_ok=True)
    return out


def cpu_tokens_per_s(model: Any, new_tokens: int = 32, repeats: int = 3) -> float:
    """New tokens per CPU-second of greedy decoding (batch 1, KV cache, 64-token prompt), in
    ``time.process_time``: on a shared machine wall-clock rates follow the other processes'
    load, CPU time follows the model. Median of ``repeats`` of (cpu(1 + n) - cpu(1)) / n."""
    import torch

    from slimtorch.eval.decode import random_prompt

    prompt = random_prompt(model.config.vocab_size, 64)

    def cpu(n: int) -> float:
        start = time.process_time()
        with torch.inference_mode():
            model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                           use_cache=True, pad_token_id=0)  # fmt: skip
        return time.process_time() - start

    cpu(4)  # warm-up
    rates = sorted(new_tokens / max(cpu(new_tokens + 1) - cpu(1), 1e-9) for _ in range(repeats))
    return rates[len(rates) // 2]


def _row(model: Any, base: Any, args: argparse.Namespace, name: str) -> dict[str, Any]:
    from bench_llm_real import score
    from slimtorch.workflows.figures import decode_figures

    row: dict[str, Any] = {"params": _params(model), "blocks": model.config.num_hidden_layers}
    if model is not base:  # the base's own figures: every row's baseline_perplexity
        row.update(score(model, base))
        row["reload_max_abs_diff"] = _reload_diff(model, args.work, name)
    row.update(decode_figures(model, None))
    row["cpu_tokens_per_s"] = cpu_tokens_per_s(model)
    if args.gguf:
        row.update(_gguf(model, base, args.work, name))
    return row


def _recover(base: Any, drop: list[int], args: argparse.Namespace) -> tuple[Any, float]:
    import slimtorch as st
    from slimtorch.core.context import Context

    recipe = [
        {"method": "prune.layers", "blocks": drop},
        {
            "method": "distill.finetune",
            "train": {
                "steps": args.recover_steps,
                "lr": args.recover_lr,
                "batch_size": args.recover_batch,
            },
        },
    ]
    start = time.perf_counter()
    result = st.compress(base, recipe, data=_task(128), ctx=Context(progress=False))
    return result.model.eval(), time.perf_counter() - start


def _width(base: Any, ratio: float, args: argparse.Namespace) -> tuple[Any, float]:
    import slimtorch as st
    from slimtorch.core.context import Context

    recipe = [
        {
            "method": "prune.structured",
            "ratio": ratio,
            "importance": args.width_importance,
            "heads": False,
            "targets": [r"re:model\.layers\.\d+\.mlp\.(gate|up)_proj"],
            "calibration_batches": args.width_batches,
        }
    ]
    from slimtorch.core.info import update_info
    from slimtorch.models.registry import load_model

    start = time.perf_counter()
    loaded = load_model(MODEL)  # a fresh copy; its info names the architecture (for tracing)
    model = loaded.model.eval()
    update_info(model, architecture=loaded.architecture, source=MODEL, tokenizer=MODEL)
    result = st.compress(model, recipe, data=_task(256), ctx=Context(progress=False))
    return result.model.eval(), time.perf_counter() - start


def _decode_cpu(models: dict[str, Any], rounds: int = 3) -> dict[str, Any]:
    """:func:`cpu_tokens_per_s` of every model, ``rounds`` times interleaved."""
    rates: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(rounds):
        for name, model in models.items():
            rates[name].append(cpu_tokens_per_s(model, repeats=1))
    return {
        "metric": "new tokens per CPU-second (process_time), 1 thread",
        "prompt_tokens": 64,
        "new_tokens": 32,
        "rates": {
            name: {"rounds": r, "median": sorted(r)[len(r) // 2]} for name, r in rates.items()
        },
        "command": "bench_llm_prune.py --decode-cpu (interleaved, one process)",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--drops", type=int, nargs="+", default=[3, 6, 9])
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--kld-samples", type=int, default=0)
    parser.add_argument("--recover", type=int, nargs="*", default=[6])
    parser.add_argument("--recover-steps", type=int, default=100)
    parser.add_argument("--recover-batch", type=int, default=4, help="128-token windows a step")
    parser.add_argument("--recover-lr", type=float, default=1e-4)
    parser.add_argument("--gguf", action="store_true")
    parser.add_argument("--width", type=float, nargs="*", default=[], help="MLP ratio removed")
    parser.add_argument(
        "--width-importance", default="activation", choices=["activation", "l2", "l1"]
    )
    parser.add_argument("--width-batches", type=int, default=1, help="32 windows a batch")
    parser.add_argument("--decode-cpu", action="store_true")
    parser.add_argument("--work", type=Path, default=Path("/tmp/llm_prune"))
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--resume", action="store_true", help="keep --out's scores and rows")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    from slimtorch.models.registry import load_model
    from slimtorch.prune.layers import lowest
    from slimtorch.prune.stages.layers import remove_blocks

    args.work.mkdir(parents=True, exist_ok=True)
    base = load_model(MODEL).model.eval()
    result: dict[str, Any] = {"model": MODEL, "threads": 1, "rows": {}}
    if args.resume:
        result = harness.read_result(args.out, result)
    rows = result["rows"]

    def save() -> None:
        harness.save_result(args.out, result)

    task = _task(256)
    if "influence" not in result:
        result["influence"] = _scores(base, task, "influence", args.samples)
        save()
    if args.kld_samples and "kld" not in result:
        result["kld"] = _scores(base, task, "kld", args.kld_samples)
        save()
    if "base" not in rows:
        rows["base"] = _row(base, base, args, "base")
        save()
    influence = result["influence"]["scores"]
    for n in args.drops:
        if f"drop-{n}" in rows:
            continue
        drop = lowest(influence, n)
        model = copy.deepcopy(base)
        remove_blocks(model, "model.layers", drop)
        rows[f"drop-{n}"] = {"dropped": drop, **_row(model, base, args, f"drop-{n}")}
        save()
        del model
    for n in args.recover:
        if f"drop-{n}-distill" in rows:
            continue
        drop = lowest(influence, n)
        model, seconds = _recover(base, drop, args)
        row = _row(model, base, args, f"drop-{n}-distill")
        rows[f"drop-{n}-distill"] = {
            "dropped": drop,
            "recovery": {
                "steps": args.recover_steps,
                "batch": args.recover_batch,
                "lr": args.recover_lr,
                "window": 128,
            },
            "recovery_wall_s": seconds,
            **row,
        }
        save()
    widths: dict[str, Any] = {}
    for ratio in args.width:
        suffix = "" if args.width_importance == "activation" else f"-{args.width_importance}"
        name = f"width-mlp-{ratio:g}{suffix}"
        if name in rows and not args.decode_cpu:
            continue
        model, seconds = _width(base, ratio, args)
        widths[name] = model
        if name in rows:
            continue
        pruned = {
            "pruned": "MLP intermediate channels of every block (heads and residual kept)",
            "mlp_channels": [layer.mlp.gate_proj.out_features for layer in model.model.layers],
            "importance": args.width_importance,
            "calibration": {"batches": args.width_batches, "windows": 32, "window": 256},
            "prune_wall_s": seconds,
        }
        rows[name] = {"ratio": ratio, **pruned, **_row(model, base, args, name)}
        save()
    if args.decode_cpu:
        models = {"base": base, **widths}
        for n in args.drops:
            model = copy.deepcopy(base)
            remove_blocks(model, "model.layers", lowest(influence, n))
            models[f"drop-{n}"] = model.eval()
        result["decode_cpu_width"] = _decode_cpu(models)
        save()
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
