"""Distillation as recovery and as a way to train a smaller model.

    .venv/bin/python bench/bench_distill.py [--only lenet|minilm] [--lenet-budget full|short|both]
                                            [--minilm-steps 200] [--keep 1,3,5 --keep 0,2,4]
                                            [--out bench/results/distill.json]
    .venv/bin/python bench/bench_distill.py --only scarce [--n-train 1000,5000] [--seeds 0,1]
                                            [--out bench/results/distill_scarce.json]

(a) LeNet-5 (builtin:lenet5-fashion) pruned to 95% (global magnitude) and quantized to 4 bits
    (quantize.qat, per channel), recovered (i) by fine-tuning on labels
    (examples/recipes/lenet5-p95-q4-finetune.yaml) and (ii) by distillation from the original
    model (examples/recipes/lenet5-p95-q4-distill.yaml: a distill.teacher stage first, so both
    training stages distil, T=4, alpha=0.9), with the same steps, lr and batch. "none" is the
    same pruning and 4-bit grid with no training at all (prune.magnitude + quantize.rtn).
    Every case runs through ``slimtorch.workflows.compress.compress_to_dir`` with
    --data builtin:fashion-mnist, which saves the artifact, reloads it with ``slimtorch.load``
    and measures test accuracy (10,000 images) of the reloaded model. Budget "full" is the
    shipped recipes (1000 fine-tuning + 500 QAT steps, batch 128); "short" is a tenth of it.
(a') "scarce": the same recovery with few labelled images. For each N in --n-train and each
    seed, a seeded random subset of N Fashion-MNIST training images (numpy default_rng(seed),
    so each seed has its own subset and its own batch order) is written to a .npz and passed as
    the task data. Recovery (i) examples/recipes/lenet5-p95-q4-finetune-fewlabels.yaml
    (600 fine-tuning + 300 QAT steps, batch 64) against (ii) the same stages preceded by
    distill.teacher (teacher = the original fp32 model): lenet5-p95-q4-distill-fewlabels.yaml
    (T=4, alpha=0.9) and the same with T=2, alpha=0.5. Nothing is chosen on the test set: every
    setting is reported. Test accuracy is always the full 10,000-image Fashion-MNIST test split,
    measured on the artifact reloaded with ``slimtorch.load``; results go to --out (default
    bench/results/distill_scarce.json).
(b) MiniLM (builtin:minilm) cut to 3 of its 6 layers (distill.shrink) and distilled by the
    minilm-l3-distill preset (embedding cosine + layer-to-layer hidden-state MSE) on sentences
    of builtin:austen+builtin:wikipedia, tokenized to at most 64 tokens; ``--minilm-steps``
    replaces the preset's 300 steps (batch 16, lr 5e-4, cosine schedule). Measured: Lee Pearson
    of the fp32 teacher, of the cut model before distillation and of the reloaded artifact after;
    mean cosine of the Lee-document embeddings to the teacher's; params; bytes on disk; median
    latency of 5 runs at batch 32 x 128 tokens (after 1 warm-up).

Everything runs on one thread (torch.set_num_threads(1)); the machine's 2 cores are shared with
other jobs, so latency and run times are noisy.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

import harness
import slimtorch as st
from slimtorch.calibrate.sentences import DEFAULT_SENTENCES, SentenceTask, load_sentences
from slimtorch.core.context import Context
from slimtorch.eval.latency import measure_latency_ms
from slimtorch.eval.size import count_params
from slimtorch.models.registry import load_model
from slimtorch.recipe import load_recipe
from slimtorch.workflows.compress import CompressOptions, compress_to_dir
from slimtorch.zoo import minilm
from slimtorch.zoo.data_images import load_fashion_mnist
from slimtorch.zoo.evaluators import evaluate_accuracy, evaluate_lee
from slimtorch.zoo.tasks import ClassificationTask

ROOT = Path(__file__).resolve().parents[1]
OUT_DEFAULT = harness.result_path("distill.json")
OUT_SCARCE = harness.result_path("distill_scarce.json")
RECIPES = ROOT / "examples" / "recipes"
NO_RECOVERY = {
    "stages": [
        {"method": "prune.magnitude", "sparsity": 0.95, "scope": "global"},
        {"method": "quantize.rtn", "bits": 4, "granularity": "per_channel"},
    ]
}
MAX_TOKENS = 64


def _scaled(recipe: dict[str, Any], factor: float) -> dict[str, Any]:
    """``recipe`` with every stage's ``train.steps`` multiplied by ``factor``."""
    out = copy.deepcopy(recipe)
    for stage in out["stages"]:
        if "train" in stage:
            stage["train"]["steps"] = max(1, int(stage["train"]["steps"] * factor))
    return out


def lenet_case(label: str, recipe: dict[str, Any], seed: int, tmp: Path) -> dict[str, Any]:
    with harness.stopwatch() as sw:
        report = compress_to_dir(
            "builtin:lenet5-fashion",
            recipe,  # type: ignore[arg-type]  # load_recipe accepts dicts
            tmp / label,
            CompressOptions(data="builtin:fashion-mnist"),
            Context(seed=seed, progress=False),
        )
    steps = sum(s.get("train", {}).get("steps", 0) for s in recipe["stages"])
    return {
        "case": label,
        "seed": seed,
        "train_steps": steps,
        "accuracy": report["value"],
        "baseline_accuracy": report["baseline_value"],
        "bytes_on_disk": report["bytes_on_disk"],
        "dense_bytes": report["dense_bytes"],
        "nonzero_params": report["nonzero_params"],
        "params": report["params"],
        "seconds": round(sw.seconds, 1),
        "recipe": recipe,
    }


def run_lenet(budgets: list[str], seed: int) -> list[dict[str, Any]]:
    finetune = load_recipe(str(RECIPES / "lenet5-p95-q4-finetune.yaml")).to_dict()
    distill = load_recipe(str(RECIPES / "lenet5-p95-q4-distill.yaml")).to_dict()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-distill-") as tmp:
        rows.append(lenet_case("none", NO_RECOVERY, seed, Path(tmp)))
        for budget in budgets:
            factor = 1.0 if budget == "full" else 0.1
            for name, rec in (("finetune", finetune), ("distill", distill)):
                row = lenet_case(f"{name}-{budget}", _scaled(rec, factor), seed, Path(tmp))
                rows.append(row)
                print(f"lenet {row['case']}: {row['accuracy']:.2f}%", file=sys.stderr)
    return rows


def _subset_npz(n: int, seed: int, directory: Path) -> Path:
    """A seeded random subset of ``n`` Fashion-MNIST training images, saved as a .npz."""
    images, labels = load_fashion_mnist("train")
    idx = np.sort(np.random.default_rng(seed).choice(len(labels), size=n, replace=False))
    path = directory / f"fashion-train-{n}-seed{seed}.npz"
    np.savez(path, images=images.numpy()[idx], labels=labels.numpy()[idx])
    return path


def _scarce_recipes() -> dict[str, dict[str, Any]]:
    finetune = load_recipe(str(RECIPES / "lenet5-p95-q4-finetune-fewlabels.yaml")).to_dict()
    distill = load_recipe(str(RECIPES / "lenet5-p95-q4-distill-fewlabels.yaml")).to_dict()
    t2 = copy.deepcopy(distill)
    t2["stages"][0]["distill"] = {"temperature": 2.0, "alpha": 0.5}
    for rec in (finetune, distill, t2):
        rec.pop("description", None)
    return {"finetune": finetune, "distill T=4 a=0.9": distill, "distill T=2 a=0.5": t2}


def scarce_case(recipe: dict[str, Any], data: Path, seed: int, out: Path) -> dict[str, Any]:
    """Compress LeNet-5 with ``recipe`` on the images of ``data``; test accuracy after reload."""
    loaded = load_model("builtin:lenet5-fashion")
    st.api.set_architecture(loaded.model, loaded.architecture)
    st.api.get_metadata(loaded.model).update(
        {"source": "builtin:lenet5-fashion", "evaluator": "accuracy"}
    )
    ctx = Context(seed=seed, progress=False)
    with harness.stopwatch() as sw:
        result = st.compress(loaded.model, recipe, data=ClassificationTask(str(data)), ctx=ctx)
    seconds = sw.seconds
    st.save(result.model, out)
    reloaded = st.load(out)
    params, nonzero = count_params(reloaded)
    return {
        "accuracy": evaluate_accuracy(reloaded, ctx, "builtin:fashion-mnist").value,
        "bytes_on_disk": st.api.artifact_size(out),
        "nonzero_params": nonzero,
        "params": params,
        "train_seconds": round(seconds, 1),
    }


def run_scarce(ns: list[int], seeds: list[int]) -> dict[str, Any]:
    recipes = _scarce_recipes()
    base = load_model("builtin:lenet5-fashion").model
    ctx = Context(progress=False)
    out: dict[str, Any] = {
        "baseline_accuracy": evaluate_accuracy(base, ctx, "builtin:fashion-mnist").value,
        "test_images": 10000,
        "recipes": recipes,
        "rows": [],
    }
    with tempfile.TemporaryDirectory(prefix="bench-distill-scarce-") as tmp:
        for n in ns:
            for seed in seeds:
                data = _subset_npz(n, seed, Path(tmp))
                for i, (name, rec) in enumerate(recipes.items()):
                    row = scarce_case(rec, data, seed, Path(tmp) / f"n{n}-s{seed}-{i}")
                    out["rows"].append({"n_train": n, "seed": seed, "case": name, **row})
                    print(
                        f"scarce N={n} seed={seed} {name}: {row['accuracy']:.2f}%", file=sys.stderr
                    )
    return out


def markdown_scarce(res: dict[str, Any]) -> str:
    seeds = sorted({r["seed"] for r in res["rows"]})
    cols = [f"seed {s}" for s in seeds]
    lines = [
        f"`{res['meta']['command']}`",
        "",
        f"LeNet-5 on Fashion-MNIST (fp32 {res['baseline_accuracy']:.2f}%), 95% sparse + 4-bit"
        " per-channel, recovered on N labelled training images (600 fine-tuning + 300 QAT steps,"
        " batch 64, for every row); test accuracy % of the reloaded artifact on all 10,000 test"
        " images:",
        "",
    ]
    header = ["N train images", "Recovery", *cols, "mean", "vs fine-tuning (pts)"]
    cells = []
    for n in sorted({r["n_train"] for r in res["rows"]}):
        ref = None
        for case in res["recipes"]:
            accs = [r["accuracy"] for r in res["rows"] if r["n_train"] == n and r["case"] == case]
            mean = sum(accs) / len(accs)
            ref = mean if ref is None else ref
            delta = "-" if case == "finetune" else f"{mean - ref:+.2f}"
            cells.append([f"{n:,}", case, *(f"{a:.2f}" for a in accs), f"{mean:.2f}", delta])
    lines.append(harness.markdown_table(header, cells, "rl" + "r" * (len(seeds) + 2)))
    return "\n".join(lines)


def _minilm_measure(model: torch.nn.Module, ctx: Context) -> dict[str, Any]:
    quality = evaluate_lee(model, ctx, None)
    params, _ = count_params(model)
    inputs = minilm.example_inputs(32)
    return {
        "lee_pearson": quality.value,
        "lee_spearman": quality.extra.get("lee_spearman"),
        "embedding_cosine": quality.extra.get("embedding_cosine"),
        "params": params,
        "latency_ms_b32": measure_latency_ms(model, inputs, warmup=1, repeats=5),
    }


def _minilm_recipe(keep: list[int], steps: int) -> dict[str, Any]:
    rec = load_recipe("minilm-l3-distill").to_dict()
    rec["stages"][0]["keep"] = keep
    rec["stages"][1]["distill"]["hidden"] = [
        {"student": f"encoder.layer.{i}", "teacher": f"encoder.layer.{k}"}
        for i, k in enumerate(keep)
    ]
    rec["stages"][1]["train"]["steps"] = steps
    return rec


def run_minilm(keeps: list[list[int]], steps: int, seed: int) -> dict[str, Any]:
    ctx = Context(seed=seed, progress=False)
    loaded = load_model("builtin:minilm")
    teacher = loaded.model
    st.api.set_architecture(teacher, loaded.architecture)
    st.api.get_metadata(teacher).update({"source": "builtin:minilm", "evaluator": "lee"})
    task = SentenceTask(load_sentences(DEFAULT_SENTENCES), max_len=MAX_TOKENS)
    out: dict[str, Any] = {
        "sentences": DEFAULT_SENTENCES,
        "n_sentences": len(task.sentences),
        "max_tokens": MAX_TOKENS,
        "steps": steps,
        "teacher": _minilm_measure(teacher, ctx),
        "students": [],
    }
    with tempfile.TemporaryDirectory(prefix="bench-distill-") as tmp:
        st.save(teacher, Path(tmp) / "teacher")
        out["teacher"]["bytes_on_disk"] = st.api.artifact_size(Path(tmp) / "teacher")
        for keep in keeps:
            recipe = _minilm_recipe(keep, steps)
            cut = st.compress(teacher, {"stages": [recipe["stages"][0]]}, ctx=ctx).model
            before = _minilm_measure(cut, ctx)
            with harness.stopwatch() as sw:
                result = st.compress(teacher, recipe, data=task, ctx=ctx)
            seconds = sw.seconds
            path = Path(tmp) / f"l3-{'-'.join(map(str, keep))}"
            st.save(result.model, path)
            after = _minilm_measure(st.load(path), ctx)
            after["bytes_on_disk"] = st.api.artifact_size(path)
            out["students"].append(
                {
                    "keep": keep,
                    "cut": before,
                    "distilled": after,
                    "train_seconds": round(seconds, 1),
                    "recipe": recipe,
                }
            )
            print(f"minilm keep {keep}: {after['lee_pearson']:.4f}", file=sys.stderr)
    return out


def markdown(results: dict[str, Any]) -> str:
    lines = []
    lenet = results.get("lenet")
    if lenet:
        base = lenet[0]["baseline_accuracy"]
        lines += [
            f"LeNet-5 on Fashion-MNIST (fp32 {base:.2f}%), 95% sparse + 4-bit per-channel:",
            "",
        ]
        header = ["Recovery", "train steps", "test acc % (reloaded)", "drop (pts)"]
        cells = [
            [r["case"], r["train_steps"], f"{r['accuracy']:.2f}", f"{r['accuracy'] - base:+.2f}",
             f"{r['bytes_on_disk']:,}"]
            for r in lenet
        ]  # fmt: skip
        lines += [harness.markdown_table([*header, "bytes on disk"], cells, "lrrrr"), ""]
    mini = results.get("minilm")
    if mini:
        t = mini["teacher"]
        lines += [
            f"MiniLM 6 -> 3 layers, distilled {mini['steps']} steps x 16 sentences"
            f" (<= {mini['max_tokens']} tokens) of {mini['sentences']}:",
            "",
        ]
        header = ["Model", "Lee Pearson", "Lee Spearman", "emb. cosine to fp32", "params",
                  "bytes on disk", "latency ms (b32 x 128)"]  # fmt: skip
        cells = [
            ["fp32 teacher (6 layers)", f"{t['lee_pearson']:.4f}", f"{t['lee_spearman']:.4f}",
             "1.0000", f"{t['params']:,}", f"{t['bytes_on_disk']:,}", f"{t['latency_ms_b32']:.0f}"]
        ]  # fmt: skip
        for s in mini["students"]:
            keep = ",".join(map(str, s["keep"]))
            for tag, m in (("cut only", s["cut"]), ("distilled", s["distilled"])):
                size = f"{m['bytes_on_disk']:,}" if "bytes_on_disk" in m else "-"
                cells.append(
                    [f"layers {keep}, {tag}", f"{m['lee_pearson']:.4f}", f"{m['lee_spearman']:.4f}",
                     f"{m['embedding_cosine']:.4f}", f"{m['params']:,}", size,
                     f"{m['latency_ms_b32']:.0f}"]
                )  # fmt: skip
        lines.append(harness.markdown_table(header, cells, "lrrrrrr"))
    return "\n".join(lines)


def _meta(argv: list[str]) -> dict[str, Any]:
    """The record of one part's run (each part keeps its own: a part not rerun keeps it)."""
    names = ("torch", "transformers", "tokenizers", "numpy", "slimtorch")
    env = harness.environment(["tokenizers"])
    return {
        "command": "python bench/bench_distill.py " + " ".join(argv),
        "threads": env["threads"],
        "versions": harness.versions(names),
        "machine": env["platform"],
        "processor": env["machine"],
        "python": env["python"],
        "environment": env,
    }


def main_scarce(args: argparse.Namespace, argv: list[str]) -> None:
    """``--only scarce``: its own results file, rewritten whole on every run."""
    with harness.stopwatch() as sw:
        ns = [int(n) for n in args.n_train.split(",")]
        seeds = [int(s) for s in args.seeds.split(",")]
        results = {**run_scarce(ns, seeds), "meta": _meta(argv)}
    results["seconds"] = round(sw.seconds, 1)
    harness.write_result(args.out or OUT_SCARCE, results)
    print(markdown_scarce(results))


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", choices=["lenet", "minilm", "scarce"])
    p.add_argument("--lenet-budget", choices=["full", "short", "both"], default="both")
    p.add_argument("--minilm-steps", type=int, default=200)
    p.add_argument("--keep", action="append", help="layers to keep, e.g. 1,3,5 (repeatable)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-train", default="1000,5000", help="scarce: training-subset sizes")
    p.add_argument("--seeds", default="0,1", help="scarce: seeds (subset, init order, batches)")
    p.add_argument("--out", type=Path, help=f"default {OUT_DEFAULT} ({OUT_SCARCE} for scarce)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    if args.only == "scarce":
        main_scarce(args, argv)
        return
    args.out = args.out or OUT_DEFAULT
    keeps = [[int(i) for i in k.split(",")] for k in (args.keep or ["1,3,5", "0,2,4"])]
    budgets = ["full", "short"] if args.lenet_budget == "both" else [args.lenet_budget]
    new: dict[str, Any] = {}
    with harness.stopwatch() as sw:
        if args.only in (None, "lenet"):
            new["lenet"] = run_lenet(budgets, args.seed)
            new["lenet_meta"] = _meta(argv)
        if args.only in (None, "minilm"):
            new["minilm"] = run_minilm(keeps, args.minilm_steps, args.seed)
            new["minilm_meta"] = _meta(argv)
    # Parts not run now keep their earlier results (each part records its own command).
    results: dict[str, Any] = harness.read_result(args.out, {})
    results.update(new)
    results.setdefault("seconds", {})[args.only or "all"] = round(sw.seconds, 1)
    harness.write_result(args.out, results)
    print(markdown(results))


if __name__ == "__main__":
    main()
