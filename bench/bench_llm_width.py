"""Depth vs width pruning at equal parameters on a real LLM, before and after the same recovery.

    .venv-bench/bin/python bench/bench_llm_width.py [--cuts 9:486 19:450,396]
        [--recover-steps 40] [--recover-batch 1] [--recover-window 256] [--recover-lr 3e-4]
        [--no-recover | --recover-only NAME ...] [--no-decode | --decode-only]
        [--work /tmp/llm_width] [--out bench/results/llm_width.json] [--resume]

Model builtin:smollm2-135m (30 blocks, hidden 576, MLP 1536, 9 query / 3 key-value heads, tied
embedding; 134,515,008 parameters). A cut ``N:H1,H2`` is "the parameters of N decoder blocks"
(counted in the total parameter count, tied embedding once): the depth row drops the N blocks of
lowest block influence (``prune.layers``, ranked as bench_llm_prune.py ranks them on 16 windows);
each width row ``width-N-hH`` keeps hidden size H (``prune.hidden``, Minitron: mean |RMSNorm
output| on 32 x 256-token windows of wikipedia + austen) and then removes as many MLP channels
of every block (``prune.structured`` on gate/up, activation importance, heads kept) as makes its
parameter count equal the depth row's (within one MLP channel per block). All rows are scored
with bench_llm_real.py's scorer (perplexity and KLD to the base on 8 x 512 held-out tokens of
wikipedia and austen each). The width row with the lowest KLD before recovery is recovered.

Recovery, identical for depth and width: the whole recipe [pruning stages, distill.finetune] runs
on the base, so the teacher is the unpruned model: pure logit distillation (KL to the teacher's
logits at temperature 1, alpha 1: no LM loss), Adam at ``--recover-lr`` (cosine) for
``--recover-steps`` steps of ``--recover-batch`` random ``--recover-window``-token windows of
the train split of wikipedia + austen, one thread; wall time reported. Decoding speed: new tokens
per CPU-second (greedy, batch 1, KV cache, 64-token prompt, 32 new tokens; bench_llm_prune's
``cpu_tokens_per_s``) of the base and every row, interleaved in one process at the end
(``--decode-only``: only that, on twins pruned to the same shapes by weight magnitude, so without
calibration passes). ``--no-recover`` / ``--recover-only`` split the work over parallel runs
(each with its own ``--out``). Hidden sizes must be multiples of the 9 heads (transformers
refuses other configs). OMP_NUM_THREADS=1. Results after every row: ``--out`` (``--resume`` keeps finished rows).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import harness
from bench_llm_prune import MODEL, _decode_cpu, _params, _reload_diff, _scores, _task

RESULTS = harness.result_path("llm_width.json")


def _fresh() -> Any:
    from slimtorch.core.info import update_info
    from slimtorch.models.registry import load_model

    loaded = load_model(MODEL)  # its info names the architecture (prune.structured traces it)
    model = loaded.model.eval()
    update_info(model, architecture=loaded.architecture, source=MODEL, tokenizer=MODEL)
    return model


def width_plan(config: Any, hidden: int, target: int) -> dict[str, int]:
    """MLP channels removed per block so that hidden size ``hidden`` (MLP cut after it) lands
    on ``target`` parameters (Llama layout, tied embedding)."""
    layers, inter = config.num_hidden_layers, config.intermediate_size
    q = config.num_attention_heads * config.head_dim
    kv = config.num_key_value_heads * config.head_dim
    tied = bool(config.tie_word_embeddings)
    per_hidden = (
        config.vocab_size * (1 if tied else 2) + layers * (2 * q + 2 * kv + 3 * inter + 2) + 1
    )
    after_hidden = per_hidden * hidden
    mlp = round((after_hidden - target) / (layers * 3 * hidden))
    if not 0 <= mlp < inter:
        raise SystemExit(f"hidden {hidden} cannot reach {target} parameters with MLP channels")
    return {"hidden": hidden, "mlp_removed": mlp, "mlp_kept": inter - mlp}


def width_recipe(base_hidden: int, inter: int, plan: dict[str, int]) -> list[dict[str, Any]]:
    stages: list[dict[str, Any]] = []
    if plan["hidden"] < base_hidden:
        stages.append({"method": "prune.hidden", "ratio": 1 - plan["hidden"] / base_hidden})
    if plan["mlp_removed"]:
        stages.append({
            "method": "prune.structured", "ratio": plan["mlp_removed"] / inter,
            "importance": "activation", "heads": False, "calibration_batches": 1,
            "targets": [r"re:model\.layers\.\d+\.mlp\.(gate|up)_proj"],
        })  # fmt: skip
    return stages


def shape_twin(recipe: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``recipe`` with weight-magnitude importance: the same shapes (so the same decoding speed)
    without calibration passes."""
    weights = {"prune.hidden": "l2", "prune.structured": "l1"}
    return [{**s, "importance": weights[s["method"]]} if s["method"] in weights else s
            for s in recipe]  # fmt: skip


def recovery_stage(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "method": "distill.finetune",
        "distill": {"temperature": 1.0, "alpha": 1.0},
        "train": {
            "steps": args.recover_steps,
            "lr": args.recover_lr,
            "batch_size": args.recover_batch,
        },
    }


def _run(recipe: list[dict[str, Any]], window: int) -> tuple[Any, float]:
    import slimtorch as st
    from slimtorch.core.context import Context

    start = time.perf_counter()
    result = st.compress(_fresh(), recipe, data=_task(window), ctx=Context(progress=False))
    return result.model.eval(), time.perf_counter() - start


def _row(model: Any, base: Any, args: argparse.Namespace, name: str) -> dict[str, Any]:
    from bench_llm_real import score

    cfg = model.config
    row: dict[str, Any] = {
        "params": _params(model),
        "blocks": cfg.num_hidden_layers,
        "hidden": cfg.hidden_size,
        "mlp": sorted({layer.mlp.gate_proj.out_features for layer in model.model.layers}),
    }
    row.update(score(model, base))
    row["reload_max_abs_diff"] = _reload_diff(model, args.work, name)
    return row


def _budget(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "steps": args.recover_steps, "batch": args.recover_batch,
        "window": args.recover_window, "lr": args.recover_lr,
        "tokens": args.recover_steps * args.recover_batch * args.recover_window,
        "loss": "KL(teacher || student) on logits, temperature 1, alpha 1 (no LM loss)",
        "optimizer": "adam, cosine", "teacher": "the unpruned base",
    }  # fmt: skip


def _cut(spec: str) -> tuple[int, list[int]]:
    blocks, _, sizes = spec.partition(":")
    return int(blocks), [int(s) for s in sizes.split(",") if s]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cuts", nargs="+", default=["9:486", "19:450,396"])
    parser.add_argument("--samples", type=int, default=16, help="block-influence windows")
    parser.add_argument("--recover-steps", type=int, default=40)
    parser.add_argument("--recover-batch", type=int, default=1)
    parser.add_argument("--recover-window", type=int, default=256)
    parser.add_argument("--recover-lr", type=float, default=3e-4)
    parser.add_argument(
        "--recover-only", nargs="*", help="only recover these rows (no other rows: parallel runs)"
    )
    parser.add_argument("--no-recover", action="store_true", help="only the unrecovered rows")
    parser.add_argument("--no-decode", action="store_true")
    parser.add_argument(
        "--decode-only", action="store_true", help="only tokens/s (weight-ranked twins, no rows)"
    )
    parser.add_argument("--work", type=Path, default=Path("/tmp/llm_width"))
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--resume", action="store_true", help="keep --out's finished rows")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    from slimtorch.prune.layers import lowest

    args.work.mkdir(parents=True, exist_ok=True)
    base = _fresh()
    cfg = base.config
    result: dict[str, Any] = {"model": MODEL, "threads": 1, "rows": {}, "recovery": _budget(args)}
    if args.resume:
        result = harness.read_result(args.out, result)
        result["recovery"] = _budget(args)  # the recovered rows record their own budget too
    rows = result["rows"]

    def save() -> None:
        harness.save_result(args.out, result)

    if "influence" not in result:
        result["influence"] = _scores(base, _task(256), "influence", args.samples)
        save()
    rows.setdefault("base", {"params": _params(base), "hidden": cfg.hidden_size})
    block = sum(p.numel() for p in base.model.layers[0].parameters())
    pruned: dict[str, Any] = {"base": base}  # for the interleaved decode at the end
    for spec in args.cuts:
        n, hiddens = _cut(spec)
        drop = lowest(result["influence"]["scores"], n)
        target = _params(base) - n * block
        depth = [{"method": "prune.layers", "blocks": drop}]
        recipes = {f"depth-{n}": depth}
        for h in hiddens:
            plan = width_plan(cfg, h, target)
            recipes[f"width-{n}-h{h}"] = width_recipe(cfg.hidden_size, cfg.intermediate_size, plan)
        if args.decode_only:  # same shapes, channels by weight magnitude (no calibration)
            pruned.update({k: _run(shape_twin(r), 256)[0] for k, r in recipes.items()})
            continue
        for name, recipe in recipes.items():
            if name not in rows and not args.recover_only:
                model, seconds = _run(recipe, 256)
                pruned[name] = model
                rows[name] = {"recipe": recipe, "prune_wall_s": seconds,
                              "cut_of_total": 1 - _params(model) / _params(base),
                              **_row(model, base, args, name)}  # fmt: skip
                save()
        widths = [k for k in recipes if k.startswith("width-")]
        scored = [k for k in widths if k in rows] or widths[:1]
        best = min(scored, key=lambda k: rows.get(k, {}).get("kld_mean", 0)) if widths else None
        for name in [f"depth-{n}", *([best] if best else [])]:
            skip = args.no_recover or (args.recover_only and name not in args.recover_only)
            if f"{name}-kd" in rows or skip:
                continue
            recipe = [*recipes[name], recovery_stage(args)]
            model, seconds = _run(recipe, args.recover_window)
            rows[f"{name}-kd"] = {"recipe": recipe, "recovery": _budget(args),
                                  "recovery_wall_s": seconds, **_row(model, base, args, name)}  # fmt: skip
            save()
    if not args.no_decode:
        for name, row in rows.items():  # rows of an earlier (--resume) run: pruned again
            if name not in pruned and not name.endswith("-kd") and not args.decode_only:
                pruned[name] = _run(row["recipe"], 256)[0]  # same shapes as after recovery
        result["decode_cpu"] = _decode_cpu(pruned)
        save()
    print(json.dumps({k: {x: v.get(x) for x in ("params", "perplexity", "kld_mean")}
                      for k, v in rows.items()}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
