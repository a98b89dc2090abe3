"""Low-rank factorization against pruning at equal parameters on MiniLM (all-MiniLM-L6-v2).

    .venv/bin/python bench/bench_lowrank.py [--steps 400] [--out bench/results/lowrank.json]
        [--skip RECIPE ...] [--only RECIPE ...]   # --only: run those rows, merge into --out

Every Linear of the encoder (36 layers, 10.6M of the 22.7M parameters; embeddings and pooler
untouched) is brought to half its parameters four ways, each without and with the same
fine-tuning (distill.finetune towards the original MiniLM on sentences of builtin:austen +
builtin:wikipedia, batch 16, lr 1e-4, cosine; `--steps` overrides the recipes' 400 steps):

- lowrank.svd, param_ratio 0.5: truncated SVD, two dense factors (really fewer weights);
- lowrank.svd with whiten: true: the SVD of W S, S S^T = the layer's input Gram matrix on 8
  batches of 16 sentences (SVD-LLM), the same ranks;
- prune.magnitude 0.5 per layer: unstructured; the model still computes densely;
- prune.nm 2:4: half of each group of 4 inputs; dense compute here (sparse kernels need a GPU);
- prune.structured ratio 0.5 (issue 5): half of every layer's attention heads (12 -> 6) and MLP
  neurons (1536 -> 768) removed, hidden size 384 kept. Heads and neurons are the encoder's only
  prunable widths and both carry the same share of Linear weights per channel removed, so ratio r
  removes r of the encoder's Linear weights (less r of the three 384-wide output biases of each
  layer): 0.5 gives 17,396,736 parameters against 17,390,976 for the low-rank rows (+0.03%).
  Its fine-tuned row appends the distill.finetune stage of minilm-lowrank50-distill.yaml, so it
  trains exactly as the low-rank rows do.

Each recipe runs through `slimtorch.compress`, is saved, loaded back with `slimtorch.load`, and
the loaded artifact is measured: Lee Pearson (the evaluator of builtin:minilm) and the mean cosine
between its document embeddings and the fp32 model's, parameters (and nonzeros), bytes on disk,
and median latency of a batch of 32 x 128 tokens. These are the steps of
`slimtorch.workflows.compress.compress_to_dir`, with the fp32 baseline measured once instead of per case.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import dataclass
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
from slimtorch.eval.latency import measure_latency_ms
from slimtorch.eval.quality import get_evaluator
from slimtorch.eval.size import count_params
from slimtorch.models.registry import load_model

MODEL = "builtin:minilm"
SENTENCES = "builtin:austen+builtin:wikipedia"
LATENCY_BATCH = 32
RECIPES = Path("examples/recipes")


@dataclass(frozen=True)
class Case:
    method: str
    finetune: bool
    recipe: str  # a file under examples/recipes
    then: str | None = None  # append this recipe's distill.finetune stages (same fine-tuning)


CASES = [
    Case("low-rank SVD (rank 50% params)", False, "minilm-lowrank50.yaml"),
    Case("low-rank whitened SVD (SVD-LLM)", False, "minilm-lowrank50-whiten.yaml"),
    Case("unstructured magnitude 50%", False, "minilm-sparse50.yaml"),
    Case("2:4 semi-structured", False, "minilm-sparse24.yaml"),
    Case("low-rank SVD (rank 50% params)", True, "minilm-lowrank50-distill.yaml"),
    Case("low-rank whitened SVD (SVD-LLM)", True, "minilm-lowrank50-whiten-distill.yaml"),
    Case("unstructured magnitude 50%", True, "minilm-sparse50-distill.yaml"),
    Case("2:4 semi-structured", True, "minilm-sparse24-distill.yaml"),
    Case("structured heads + MLP 50%", False, "minilm-structured50.yaml"),
    Case(
        "structured heads + MLP 50%",
        True,
        "minilm-structured50.yaml",
        then="minilm-lowrank50-distill.yaml",
    ),
]


def case_key(case: Case) -> str:
    """What names a case in --skip / --only and in the results file."""
    return case.recipe if case.then is None else f"{case.recipe}+{case.then}"


def recipe_with_steps(path: Path, steps: int | None) -> dict[str, Any]:
    """The recipe at ``path`` with every distill.finetune stage set to ``steps`` (None: as is)."""
    raw = yaml.safe_load(path.read_text())
    for stage in raw["stages"]:
        if stage["method"] == "distill.finetune" and steps is not None:
            stage.setdefault("train", {})["steps"] = steps
    return raw


def measure(model: torch.nn.Module, ctx: Context, repeats: int) -> dict[str, Any]:
    """Parameters, Lee quality and batch-32 latency of ``model`` (what api.evaluate measures)."""
    params, nonzero = count_params(model)
    inputs = api.example_inputs_for(model, model_info(model).architecture or {}, LATENCY_BATCH)
    assert inputs is not None, "MiniLM's example inputs are known"
    quality = get_evaluator("lee")(model, ctx, "builtin:lee")
    return {
        "params": params,
        "nonzero_params": nonzero,
        "lee_pearson": quality.value,
        "lee_spearman": quality.extra.get("lee_spearman"),
        "embedding_cosine": quality.extra.get("embedding_cosine"),
        "latency_ms": measure_latency_ms(model, inputs, warmup=2, repeats=repeats),
    }


def fresh_model() -> torch.nn.Module:
    loaded = load_model(MODEL)
    api.set_architecture(loaded.model, loaded.architecture)
    meta = {"source": MODEL, "evaluator": "lee", "data": "builtin:lee", "input": None}
    api.get_metadata(loaded.model).update(meta)
    return loaded.model


def case_recipe(case: Case, steps: int | None) -> dict[str, Any]:
    recipe = recipe_with_steps(RECIPES / case.recipe, steps)
    if case.then is not None:
        extra = recipe_with_steps(RECIPES / case.then, steps)["stages"]
        recipe["stages"] += [s for s in extra if s["method"] == "distill.finetune"]
    return recipe


def run_case(case: Case, steps: int | None, ctx: Context, repeats: int) -> dict[str, Any]:
    recipe = case_recipe(case, steps)
    task = make_task("sentences", SENTENCES)
    with tempfile.TemporaryDirectory(prefix="slimtorch-lowrank-") as tmp:
        out = Path(tmp) / "out"
        with harness.stopwatch() as sw:
            result = st.compress(fresh_model(), recipe, task, ctx)
        compress_s = sw.seconds
        st.save(result.model, out)
        reloaded = st.load(out)
        row = measure(reloaded, ctx, repeats)
        row["bytes_on_disk"] = api.artifact_size(out)
    ft = [s for s in recipe["stages"] if s["method"] == "distill.finetune"]
    row.update(
        {
            "method": case.method,
            "finetune": ft[0]["train"] if ft else None,
            "recipe": str(RECIPES / case_key(case)),
            "dense_bytes": result.dense_bytes,
            "compress_seconds": round(compress_s, 1),
        }
    )
    return row


def markdown(base: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    header = ["method", "fine-tuned", f"Lee Pearson (fp32 {base['lee_pearson']:.4f})", "Δ",
              "embedding cosine", "params (nonzero)", "bytes on disk", "latency b32 ms"]  # fmt: skip
    cells = [
        ["fp32 MiniLM", "-", f"{base['lee_pearson']:.4f}", 0, "1.0000",
         f"{base['params'] / 1e6:.2f}M ({base['nonzero_params'] / 1e6:.2f}M)",
         f"{base['bytes_on_disk']:,}", f"{base['latency_ms']:.0f}"]
    ]  # fmt: skip
    for r in rows:
        ft = f"{r['finetune']['steps']} steps" if r["finetune"] else "no"
        cells.append(
            [r["method"], ft, f"{r['lee_pearson']:.4f}",
             f"{r['lee_pearson'] - base['lee_pearson']:+.4f}", f"{r['embedding_cosine']:.4f}",
             f"{r['params'] / 1e6:.2f}M ({r['nonzero_params'] / 1e6:.2f}M)",
             f"{r['bytes_on_disk']:,}", f"{r['latency_ms']:.0f}"]
        )  # fmt: skip
    return harness.markdown_table(header, cells, "llrrrrrr")


def baseline(ctx: Context, repeats: int) -> dict[str, Any]:
    model = fresh_model()
    row = measure(model, ctx, repeats)
    with tempfile.TemporaryDirectory(prefix="slimtorch-lowrank-") as tmp:
        st.save(model, Path(tmp) / "out")
        row["bytes_on_disk"] = api.artifact_size(Path(tmp) / "out")
    return row


def merge_rows(
    args: argparse.Namespace,
    command: str,
    base: dict[str, Any],
    base_end: float,
    rows: list[dict[str, Any]],
) -> None:
    """``--only``: put ``rows`` into the results file in place of rows of the same recipe."""
    command += f" --threads {args.threads} --only " + " ".join(args.only)
    for row in rows:
        row["command"] = command
        row["baseline_same_run"] = {**base, "latency_ms_at_end": base_end}
    env = harness.environment()
    for row in rows:
        row["environment"] = env
    record: dict[str, Any] = harness.read_result(args.out, {})
    record.setdefault("baseline", base)
    new = {r["recipe"] for r in rows}
    record["rows"] = [r for r in record.get("rows", []) if r["recipe"] not in new] + rows
    harness.write_result(args.out, record)
    print(markdown(record["baseline"], record["rows"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=harness.result_path("lowrank.json"))
    parser.add_argument("--steps", type=int, default=None, help="distill steps (default: recipe)")
    parser.add_argument("--repeats", type=int, default=7, help="latency runs per model")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip", nargs="*", default=[], help="recipe files to leave out")
    parser.add_argument(
        "--only",
        nargs="*",
        default=None,
        help="run only these cases (recipe file, or file+file for appended fine-tuning) and merge"
        " their rows into --out, keeping its other rows and its baseline",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ctx = Context(progress=False)
    wall = harness.stopwatch()
    base = baseline(ctx, args.repeats)
    print(json.dumps({"method": "fp32", **base}), flush=True)
    rows = []
    for case in CASES:
        if case_key(case) in args.skip or (args.only and case_key(case) not in args.only):
            continue
        rows.append(run_case(case, args.steps, ctx, args.repeats))
        print(json.dumps(rows[-1]), flush=True)
    base_end = measure(fresh_model(), ctx, args.repeats)["latency_ms"]
    command = "bench/bench_lowrank.py" + (f" --steps {args.steps}" if args.steps else "")
    if args.skip:
        command += " --skip " + " ".join(args.skip)
    if args.only:
        merge_rows(args, command, base, base_end, rows)
        return
    env = harness.environment()
    record = {
        "command": command,
        "torch": env["torch"],
        "slimtorch": st.__version__,
        "machine": env["machine"],
        "threads": env["threads"],
        "latency": f"median of {args.repeats} runs, batch {LATENCY_BATCH} x 128 tokens",
        "baseline": base,
        "baseline_latency_ms_at_end": base_end,
        "rows": rows,
        "wall_seconds": round(wall.seconds),
        "environment": env,
    }
    harness.write_result(args.out, record)
    print(markdown(base, rows))


if __name__ == "__main__":
    main()
