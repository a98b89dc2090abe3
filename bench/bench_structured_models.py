"""Structured pruning on real models: whole hidden units, heads and neurons removed (issue 5).

    .venv/bin/python bench/bench_structured_models.py [--only charlm|minilm]
        [--charlm-steps 400] [--no-distill] [--minilm-steps 150] [--repeats 12]
        [--out bench/results/structured_models.json]

charlm: textgenrnn's character LSTM (builtin:char-lstm, 2 x LSTM-128) with half the hidden units
    of both LSTMs removed (examples/recipes/charlstm-structured50.yaml: prune.structured ratio 0.5,
    targets [LSTM], L1 importance per unit), and a second variant with every prunable group at 0.5
    (no targets: the embedding dimension 100 -> 50 too). Each is measured right after pruning and
    after a short recovery on the Austen training split (``--charlm-steps`` steps of 64 windows,
    Adam lr 2e-3, cosine): train.finetune on labels, and distill.finetune from the unpruned model
    (KL at T=2 mixed 0.5/0.5 with the labels). A control row gives the unpruned model the same
    fine-tuning (textgenrnn was not trained on Austen, so fine-tuning alone lowers its bpc).
    Metric: bits per character on 20,000 fixed held-out Austen positions (evaluator ``bpc``).
    Results go under the key ``charlm`` (400 steps) or ``charlm_<N>steps`` for other budgets, so
    runs at several budgets sit side by side; ``--no-distill`` leaves out the distill rows.
minilm: all-MiniLM-L6-v2 (builtin:minilm) with half of every layer's attention heads (12 -> 6) and
    half its MLP neurons (1536 -> 768) removed; the hidden size stays 384
    (examples/recipes/minilm-structured50.yaml), then recovered by distillation from the unpruned
    model on Austen + Wikipedia sentences: embedding cosine + hidden-state MSE of layer i to
    teacher layer i (examples/recipes/minilm-structured50-distill.yaml, batch 16, lr 1e-4;
    ``--minilm-steps`` replaces its 400 steps). Metric: Lee Pearson (evaluator ``lee``).

Every model is compressed with ``slimtorch.compress``, saved with ``slimtorch.save``, loaded back
with ``slimtorch.load``; quality, parameters and latency are those of the loaded artifact, bytes
are the saved directory. Latency: one thread, batch 1 and batch 32 (char-LSTM: 40 characters;
MiniLM: 128 tokens), median over ``--repeats`` runs taken in rounds that alternate between the
models of a section (the machine is shared, so interleaving keeps the ratios fair).
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import yaml

import harness
import slimtorch as st
from slimtorch import api
from slimtorch.calibrate.tasks import make_task
from slimtorch.core.context import Context
from slimtorch.core.info import model_info
from slimtorch.eval.quality import get_evaluator
from slimtorch.eval.size import count_params
from slimtorch.models.registry import load_model

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "examples" / "recipes"
OUT_DEFAULT = harness.result_path("structured_models.json")
ROUNDS = 3


def fresh(name: str, evaluator: str) -> torch.nn.Module:
    loaded = load_model(name)
    api.set_architecture(loaded.model, loaded.architecture)
    api.get_metadata(loaded.model).update({"source": name, "evaluator": evaluator})
    return loaded.model


def shapes(model: torch.nn.Module) -> dict[str, list[int]]:
    """Weight shapes of the model's layers (what the pruning left)."""
    return {
        n: list(m.weight.shape)
        for n, m in model.named_modules()
        if isinstance(getattr(m, "weight", None), torch.Tensor)
    } | {
        f"{n}.hidden_size": [m.hidden_size]
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.LSTM)
    }


def latencies(models: dict[str, torch.nn.Module], batch: int, repeats: int) -> dict[str, float]:
    """Median ms per model at ``batch``, in ``ROUNDS`` rounds alternating between the models."""
    inputs = {
        k: api.example_inputs_for(m, model_info(m).architecture or {}, batch)
        for k, m in models.items()
    }
    calls = {k: (lambda m=m, x=inputs[k]: m(*x)) for k, m in models.items()}
    for m in models.values():
        m.eval()
    with torch.inference_mode():  # a round: 1 warm-up run, then the median of repeats // ROUNDS
        times = harness.interleaved(
            calls, ROUNDS, warmup=0, round_warmup=1, repeat=max(1, repeats // ROUNDS)
        )
    return {k: t.median for k, t in times.items()}


def artifact(model: torch.nn.Module, tmp: Path, label: str) -> tuple[torch.nn.Module, int]:
    """Save ``model`` under ``tmp``, load it back: (loaded model, bytes on disk)."""
    path = tmp / label
    st.save(model, path)
    return st.load(path, trust_factory=True), api.artifact_size(path)  # ours, maybe a factory


def quality(model: torch.nn.Module, evaluator: str, ctx: Context) -> dict[str, Any]:
    q = get_evaluator(evaluator)(model, ctx, None)
    params, _ = count_params(model)
    return {
        "value": q.value,
        **{k: v for k, v in q.extra.items() if isinstance(v, float)},
        "params": params,
    }


def case(
    name: str,
    evaluator: str,
    recipe: dict[str, Any],
    task: Any,
    ctx: Context,
    tmp: Path,
    label: str,
) -> tuple[dict[str, Any], torch.nn.Module]:
    with harness.stopwatch() as sw:
        result = st.compress(fresh(name, evaluator), copy.deepcopy(recipe), task, ctx)
    seconds = sw.seconds
    loaded, size = artifact(result.model, tmp, label)
    row = {"case": label, **quality(loaded, evaluator, ctx), "bytes_on_disk": size}
    row |= {"compress_seconds": round(seconds, 1), "recipe": recipe, "shapes": shapes(loaded)}
    print(f"{label}: {evaluator} {row['value']:.4f} ({seconds:.0f} s)", file=sys.stderr, flush=True)
    return row, loaded


def _with_steps(recipe: dict[str, Any], steps: int) -> dict[str, Any]:
    out = copy.deepcopy(recipe)
    out.pop("description", None)
    for stage in out["stages"]:
        if "train" in stage:
            stage["train"]["steps"] = steps
    return out


def charlm_recipes(steps: int) -> dict[str, dict[str, Any]]:
    """The cases of the char-LSTM section, by label."""
    base = _with_steps(yaml.safe_load((RECIPES / "charlstm-structured50.yaml").read_text()), steps)
    prune, finetune = base["stages"]
    everything = {k: v for k, v in prune.items() if k != "targets"}
    distill = {"method": "distill.finetune", "train": finetune["train"]}
    out = {}
    for tag, p in (("LSTM units 50%", prune), ("all groups 50%", everything)):
        out[f"{tag}, pruned only"] = {"stages": [p]}
        out[f"{tag} + finetune"] = {"stages": [p, finetune]}
        out[f"{tag} + distill"] = {"stages": [p, distill]}
    out["unpruned + same finetune (control)"] = {"stages": [finetune]}
    return out


def charlm_budget_recipes(steps: int) -> dict[str, dict[str, Any]]:
    """Same total training budget, three ways to spend it (LSTM hidden units 50%)."""
    base = _with_steps(yaml.safe_load((RECIPES / "charlstm-structured50.yaml").read_text()), steps)
    prune, finetune = base["stages"]
    iterative = {**prune, "steps": 4, "finetune_steps": steps // 8, "train": finetune["train"]}
    rest = {**finetune, "train": {**finetune["train"], "steps": steps - 4 * (steps // 8)}}
    distill = {
        "method": "distill.finetune",
        "distill": {"temperature": 2.0, "alpha": 0.5},
        "train": finetune["train"],
    }
    return {
        f"one-shot L1 + finetune {steps}": {"stages": [prune, finetune]},
        f"one-shot taylor + finetune {steps}": {
            "stages": [{**prune, "importance": "taylor"}, finetune]
        },
        f"4 steps (finetune {steps // 8} each) + finetune {rest['train']['steps']}": {
            "stages": [iterative, rest]
        },
        f"one-shot L1 + distill {steps}": {"stages": [prune, distill]},
        f"unpruned + finetune {steps} (control)": {"stages": [finetune]},
    }


def run_section(
    name: str, evaluator: str, recipes: dict[str, dict[str, Any]], task: Any, repeats: int
) -> dict[str, Any]:
    ctx = Context(progress=False)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-structured-") as tmp:
        base_model, base_bytes = artifact(fresh(name, evaluator), Path(tmp), "original")
        base = {
            "case": "original",
            **quality(base_model, evaluator, ctx),
            "bytes_on_disk": base_bytes,
        }
        print(f"original: {evaluator} {base['value']:.4f}", file=sys.stderr, flush=True)
        models = {"original": base_model}
        for label, recipe in recipes.items():
            row, loaded = case(name, evaluator, recipe, task, ctx, Path(tmp), label)
            rows.append(row)
            models[label] = loaded
        for batch in (1, 32):
            lat = latencies(models, batch, repeats)
            for r in [base, *rows]:
                r[f"latency_ms_b{batch}"] = lat[r["case"]]
    return {"model": name, "evaluator": evaluator, "baseline": base, "rows": rows}


def minilm_recipes(steps: int) -> dict[str, dict[str, Any]]:
    pruned = yaml.safe_load((RECIPES / "minilm-structured50.yaml").read_text())
    distill = yaml.safe_load((RECIPES / "minilm-structured50-distill.yaml").read_text())
    pruned.pop("description")
    return {
        "heads + MLP 50%, pruned only": pruned,
        "heads + MLP 50% + distill": _with_steps(distill, steps),
    }


def markdown(section: dict[str, Any]) -> str:
    base = section["baseline"]
    metric = section["evaluator"]
    header = ["model", metric, "Δ", "params", "bytes on disk", "latency b1 ms", "latency b32 ms",
              "speed-up b1 / b32"]  # fmt: skip
    cells = [
        [r["case"], f"{r['value']:.4f}", f"{r['value'] - base['value']:+.4f}", f"{r['params']:,}",
         f"{r['bytes_on_disk']:,}", f"{r['latency_ms_b1']:.2f}", f"{r['latency_ms_b32']:.1f}",
         f"{base['latency_ms_b1'] / r['latency_ms_b1']:.2f}x /"
         f" {base['latency_ms_b32'] / r['latency_ms_b32']:.2f}x"]
        for r in [base, *section["rows"]]
    ]  # fmt: skip
    return harness.markdown_table(header, cells, "l" + "r" * 7)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", choices=["charlm", "minilm"])
    p.add_argument("--charlm-steps", type=int, default=400)
    p.add_argument("--no-distill", action="store_true", help="charlm: leave out distill rows")
    p.add_argument("--cases", nargs="*", help="charlm budget: only cases whose label has one")
    p.add_argument(
        "--charlm-budget",
        action="store_true",
        help="charlm: one-shot vs taylor vs iterative vs distill at the same training budget",
    )
    p.add_argument("--minilm-steps", type=int, default=150)
    p.add_argument("--repeats", type=int, default=12, help="latency runs per model and batch")
    p.add_argument("--out", type=Path, default=OUT_DEFAULT)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    env = harness.environment()
    meta = {
        "command": "python bench/bench_structured_models.py " + " ".join(argv),
        "torch": env["torch"],
        "slimtorch": st.__version__,
        "machine": env["machine"],
        "threads": env["threads"],
        "environment": env,
    }
    new: dict[str, Any] = {}
    if args.only in (None, "charlm"):
        wall = harness.stopwatch()
        recipes = charlm_recipes(args.charlm_steps)
        if args.no_distill:
            recipes = {k: v for k, v in recipes.items() if not k.endswith("distill")}
        key = "charlm" if args.charlm_steps == 400 else f"charlm_{args.charlm_steps}steps"
        if args.charlm_budget:
            recipes = charlm_budget_recipes(args.charlm_steps)
            key = f"charlm_budget_{args.charlm_steps}"
            if args.cases:
                recipes = {k: v for k, v in recipes.items() if any(c in k for c in args.cases)}
        new[key] = run_section(
            "builtin:char-lstm", "bpc", recipes, make_task("charlm", None), args.repeats
        )
        new[key] |= {"meta": meta, "seconds": round(wall.seconds)}
    if args.only in (None, "minilm"):
        wall = harness.stopwatch()
        recipes = minilm_recipes(args.minilm_steps)
        new["minilm"] = run_section("builtin:minilm", "lee", recipes, None, args.repeats)
        new["minilm"] |= {"meta": meta, "seconds": round(wall.seconds)}
    # Sections not run now keep their earlier results (each records its own command).
    results: dict[str, Any] = harness.read_result(args.out, {})
    results.update(new)
    harness.write_result(args.out, results)
    for key, section in results.items():
        print(f"\n{key}: `{section['meta']['command']}`\n\n{markdown(section)}")


if __name__ == "__main__":
    main()
