"""Genetic vs greedy channel reordering at equal compute, for 2:4 sparsity and for a sparse index.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_reorder_genetic.py [--skip-minilm]
        [--out bench/results/reorder_genetic.json]

1. N:M (2:4) kept magnitude, per weight, at equal WALL TIME (one thread, measured back to
   back in one process; greedy has no fitness evaluations to count, its gain table is not a
   fitness call): greedy (`find_permutation`, default settings) takes T seconds; the genetic
   search (`genetic_permutation`: population 32, OX1 crossover, swaps, elitism, seeded from the
   identity and the spread order) gets `time_budget` T, and 4T on the small layers;
   "greedy + GA" refines greedy's order with the genetic search for another T. Layers:
   LeNet-5 conv2 ([50*25, 20] channel matrix), fc1 ([500, 800], free columns: an upper bound),
   fc2 ([10, 500]); MiniLM layer 0 attention query ([384, 384]) and FFN output ([384, 1536]).
2. Accuracy after 2:4 on builtin:lenet5-fashion (Fashion-MNIST test split; the stage searches
   the realisable groups conv1->conv2 and fc1->fc2): `prune.nm` alone, after `prune.permute`
   greedy, and after `prune.permute search: genetic` with `time_budget` = greedy's stage time
   divided by the groups searched (equal wall time).
3. Index objective: bits of the cheapest index (bitmask or Huffman-coded relative indices) of
   90% per-layer magnitude pruning, at equal FITNESS EVALUATIONS: identity order, density order
   (no search), greedy swap climb from the better start, genetic search from both. Layers:
   LeNet-5 fc1 (50 channels of 16 columns, realisable through conv2) and fc2, MiniLM layer 0
   FFN output. Then the artifact: LeNet-5 with `prune.magnitude 0.9` alone vs after
   `prune.permute objective: index` (both searches), bytes on disk of `slimtorch.save` with
   entropy "none" (the default: no Huffman) and "huffman" (what the index objective scores).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

import harness
import slimtorch as st
from slimtorch.core.context import Context
from slimtorch.core.info import update_info
from slimtorch.formats.sizes import artifact_bytes
from slimtorch.models.registry import load_model
from slimtorch.prune.criteria import magnitude_mask
from slimtorch.prune.genetic import (
    GeneticOptions,
    budget_generations,
    density_order,
    genetic_permutation,
    genetic_search,
    index_fitness,
    nm_fitness,
    swap_climb,
)
from slimtorch.prune.permutation import channel_matrix, find_permutation
from slimtorch.zoo.data_images import load_fashion_mnist, to_model_input

POP = 32


def lenet5() -> nn.Module:
    """builtin:lenet5-fashion with its architecture recorded (prune.permute traces it)."""
    loaded = load_model("builtin:lenet5-fashion")
    update_info(loaded.model, architecture=loaded.architecture)
    return loaded.model


def _log(row: dict[str, Any]) -> None:
    print(json.dumps(row), file=sys.stderr, flush=True)


def nm_row(name: str, w: torch.Tensor, multiples: tuple[int, ...]) -> dict[str, Any]:
    total = float(w.abs().double().sum())
    greedy = find_permutation([w], 2, 4)
    row: dict[str, Any] = {
        "layer": name, "shape": list(w.shape), "identity": greedy.identity_kept / total,
        "greedy": greedy.kept / total, "greedy_seconds": round(greedy.seconds, 2),
    }  # fmt: skip
    for k in multiples:
        opts = GeneticOptions(POP, 10**9, time_budget=k * greedy.seconds)
        ga = genetic_permutation([w], 2, 4, opts)
        row[f"genetic_{k}x"] = ga.fitness / total
        row[f"genetic_{k}x_evaluations"] = ga.evaluations
    refine = genetic_search(nm_fitness([w], 2, 4), [greedy.perm],
                            GeneticOptions(POP, 10**9, time_budget=greedy.seconds), group=4)  # fmt: skip
    row["greedy+genetic_1x"] = refine.fitness / total
    _log(row)
    return row


def fashion_accuracy(model: nn.Module) -> float:
    images, labels = load_fashion_mnist("test")
    with torch.no_grad():
        pred = model.eval()(to_model_input(images)).argmax(1)
    return round(100 * float((pred == labels).float().mean()), 2)


def lenet_accuracy() -> dict[str, Any]:
    model = lenet5()
    nm = {"method": "prune.nm", "n": 2, "m": 4, "skip_incompatible": True}
    ctx = Context(progress=False)
    rows: dict[str, Any] = {"dense": fashion_accuracy(model)}
    rows["2:4 only"] = fashion_accuracy(st.compress(model, [nm], ctx=ctx).model)
    start = time.perf_counter()
    greedy = st.compress(model, [{"method": "prune.permute"}, nm], ctx=ctx).model
    seconds = time.perf_counter() - start
    rows["2:4 after greedy"] = fashion_accuracy(greedy)
    per_group = seconds / 2  # conv1->conv2 and fc1->fc2
    genetic = [{"method": "prune.permute", "search": "genetic", "generations": 10**6,
                "time_budget": per_group}, nm]  # fmt: skip
    rows["2:4 after genetic"] = fashion_accuracy(st.compress(model, genetic, ctx=ctx).model)
    rows["greedy_stage_seconds"] = round(seconds, 2)
    _log(rows)
    return rows


def index_row(name: str, mask: torch.Tensor, evaluations: int) -> dict[str, Any]:
    fit = index_fitness([mask])
    c = mask.shape[1]
    starts = [torch.arange(c), density_order([mask])]
    values = fit(torch.stack(starts))
    best = starts[int(values.argmax())]
    climb = swap_climb(fit, best, evaluations)
    opts = GeneticOptions(POP, budget_generations(evaluations, GeneticOptions(POP)))
    ga = genetic_search(fit, starts, opts)
    row = {
        "layer": name, "mask": list(mask.shape), "kept": int(mask.sum()),
        "bits_identity": -float(values[0]), "bits_density": -float(values[1]),
        "bits_greedy": -climb.fitness, "bits_genetic": -ga.fitness,
        "evaluations": [climb.evaluations, ga.evaluations],
        "seconds": [round(climb.seconds, 1), round(ga.seconds, 1)],
    }  # fmt: skip
    _log(row)
    return row


def lenet_artifact() -> dict[str, Any]:
    model = lenet5()
    mag = {"method": "prune.magnitude", "sparsity": 0.9}
    ctx = Context(progress=False)
    out: dict[str, Any] = {}
    recipes = {
        "magnitude 0.9": [mag],
        "index greedy + magnitude 0.9": [
            {"method": "prune.permute", "objective": "index", "generations": 30}, mag],
        "index genetic + magnitude 0.9": [{"method": "prune.permute", "objective": "index",
                                           "search": "genetic", "generations": 30}, mag],
    }  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        for label, recipe in recipes.items():
            result = st.compress(model, recipe, ctx=ctx)
            out[label] = {"accuracy": fashion_accuracy(result.model)}
            for entropy in ("none", "huffman"):  # the index objective assumes huffman
                path = Path(tmp) / f"{label.replace(' ', '_')}-{entropy}"
                st.save(result.model, path, entropy=entropy)
                out[label][f"bytes_entropy_{entropy}"] = artifact_bytes(path)
                manifest = json.loads((path / "manifest.json").read_text())
                out[label][f"weight_bytes_entropy_{entropy}"] = sum(
                    v["bytes"] for k, v in manifest["tensors"].items() if k.endswith("weight")
                )
    _log(out)
    return out


def index_part(lenet: nn.Module, evaluations: int, minilm: bool) -> dict[str, Any]:
    fc1 = magnitude_mask(lenet.fc1.weight.detach(), 0.9).reshape(500, 50, 16)
    fc2 = magnitude_mask(lenet.fc2.weight.detach(), 0.9).unsqueeze(-1)
    rows = [index_row("lenet5 fc1 (50 x 16 cols)", fc1, evaluations),
            index_row("lenet5 fc2", fc2, evaluations)]  # fmt: skip
    if minilm:
        w = load_model("builtin:minilm").model.encoder.layer[0].output.dense.weight.detach()
        rows.append(index_row("minilm L0 FFN output", magnitude_mask(w, 0.9)[..., None],
                              evaluations // 2))  # fmt: skip
    return {"index_equal_evaluations": rows, "lenet5_artifact_index": lenet_artifact()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--skip-minilm", action="store_true")
    parser.add_argument("--index-only", action="store_true", help="part 3 only")
    parser.add_argument("--evaluations", type=int, default=932)
    parser.add_argument("--out", type=Path, default=harness.result_path("reorder_genetic.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    lenet = lenet5()
    record: dict[str, Any] = {
        "command": " ".join(["bench/bench_reorder_genetic.py", *sys.argv[1:]]), "threads": 1,
        "population": POP,
    }  # fmt: skip
    if not args.index_only:
        rows = [nm_row("lenet5 conv2", channel_matrix(lenet.conv2.weight.detach()), (1, 4)),
                nm_row("lenet5 fc2", lenet.fc2.weight.detach(), (1, 4)),
                nm_row("lenet5 fc1 (free columns)", lenet.fc1.weight.detach(), (1,))]  # fmt: skip
        record["nm_equal_wall_time"] = rows
        record["lenet5_accuracy_2of4"] = lenet_accuracy()
        if not args.skip_minilm:
            layer = load_model("builtin:minilm").model.encoder.layer[0]
            rows.append(nm_row("minilm L0 query", layer.attention.self.query.weight.detach(), (1,)))
            rows.append(nm_row("minilm L0 FFN output", layer.output.dense.weight.detach(), (1,)))
        harness.write_result(args.out, harness.with_environment(record))
    record.update(index_part(lenet, args.evaluations, not args.skip_minilm))
    harness.write_result(args.out, harness.with_environment(record))


if __name__ == "__main__":
    main()
