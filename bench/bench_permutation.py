"""Channel permutations for 2:4 sparsity (Pool & Yu 2021) on the weights of real models.

    .venv/bin/python bench/bench_permutation.py [--n 2 --m 4] [--out bench/results/permutation.json]

For each weight, the fraction of its total |w| that 2:4 magnitude pruning keeps, in the
original input-channel order and in the order `slimtorch.prune.permutation.find_permutation`
finds (seed 0, default search settings), next to the ceiling of any 2:4 order: unstructured 50%
magnitude pruning. Weights only; nothing is pruned or fine-tuned here.

- builtin:minilm (all-MiniLM-L6-v2): every Linear searched on its own ("per_layer"), an upper
  bound where the order cannot be chosen per layer. Realisable groupings ("shared"): the hidden
  size 384 is one channel space for the whole residual stream, so one order serves the query,
  key, value and intermediate of all 6 layers plus the pooler (25 matrices, searched jointly); the
  FFN inner size 1536 is private to each layer (output.dense; producer intermediate.dense). The
  attention-output input (12 heads x 32) is realisable only within heads (not searched jointly).
- builtin:lenet5-fashion: conv2 (20 input channels; a conv's matrix view puts the input channel
  fastest, so `channel_matrix` gives [out * 25, 20] with exactly its 2:4 groups), fc1 and fc2.
  conv1 has one input channel, so no 2:4 layout. fc1 reads conv2's 50 channels x 16 positions
  flattened channel-major: reordering conv2's outputs moves blocks of 16 columns, which never
  changes a 2:4 group, so the realisable gain on fc1 is 0; its free-column number is an upper
  bound that would need a gather on the activation.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

import harness
from slimtorch.models.registry import load_model
from slimtorch.prune.permutation import channel_matrix, find_permutation


def _unstructured_kept(w: torch.Tensor, keep: float) -> float:
    flat = w.detach().abs().flatten().double()
    return float(flat.topk(round(keep * flat.numel())).values.sum())


def measure(name: str, mats: list[torch.Tensor], n: int, m: int, seed: int) -> dict[str, Any]:
    total = sum(float(w.detach().abs().double().sum()) for w in mats)
    result = find_permutation(mats, n, m, seed=seed)
    return {
        "name": name,
        "matrices": len(mats),
        "rows": sum(int(w.shape[0]) for w in mats),
        "channels": int(mats[0].shape[1]),
        "kept_identity": result.identity_kept / total,
        "kept_permuted": result.kept / total,
        "kept_unstructured": sum(_unstructured_kept(w, n / m) for w in mats) / total,
        "gain_pct": 100 * result.gain,
        "swaps": result.swaps,
        "seconds": round(result.seconds, 2),
        "abs_total": total,
    }


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    total = sum(r["abs_total"] for r in rows)

    def frac(key: str) -> float:
        return sum(r[key] * r["abs_total"] for r in rows) / total

    ident, perm = frac("kept_identity"), frac("kept_permuted")
    return {
        "kept_identity": ident,
        "kept_permuted": perm,
        "kept_unstructured": frac("kept_unstructured"),
        "gain_pct": 100 * (perm / ident - 1),
        "seconds": round(sum(r["seconds"] for r in rows), 1),
    }


def _linears(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        n: mod.weight.detach() for n, mod in model.named_modules() if isinstance(mod, nn.Linear)
    }


def minilm(n: int, m: int, seed: int) -> dict[str, Any]:
    weights = _linears(load_model("builtin:minilm").model)
    per_layer = [measure(k, [w], n, m, seed) for k, w in weights.items()]
    for row in per_layer:
        print(json.dumps(row), file=sys.stderr, flush=True)
    hidden = [w for k, w in weights.items() if k.endswith(("self.query", "self.key", "self.value"))]
    hidden += [w for k, w in weights.items() if k.endswith("intermediate.dense")]
    hidden += [w for k, w in weights.items() if k == "pooler.dense"]
    shared = [measure("hidden (q,k,v,intermediate x6 + pooler)", hidden, n, m, seed)]
    shared += [
        r for r in per_layer if r["name"].endswith("output.dense") and "attention" not in r["name"]
    ]
    return {
        "per_layer": per_layer,
        "per_layer_summary": summary(per_layer),
        "shared": shared,
        "shared_summary": summary(shared),
    }


def lenet5(n: int, m: int, seed: int) -> dict[str, Any]:
    model = load_model("builtin:lenet5-fashion").model
    weights = {k: channel_matrix(w) for k, w in _linears(model).items()}
    conv2 = model.get_submodule("conv2")
    assert isinstance(conv2, nn.Conv2d)
    rows = [measure("conv2", [channel_matrix(conv2.weight.detach())], n, m, seed)]
    rows += [measure(k, [w], n, m, seed) for k, w in weights.items()]
    realisable = [dict(r) for r in rows]
    for r in realisable:
        if r["name"] == "fc1":  # only blocks of 16 columns move: no 2:4 group changes
            r.update(kept_permuted=r["kept_identity"], gain_pct=0.0)
    return {
        "per_layer": rows,
        "per_layer_summary": summary(rows),
        "realisable_summary": summary(realisable),
        "skipped": {"conv1": "1 input channel"},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=2)
    parser.add_argument("--m", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=harness.result_path("permutation.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    wall = harness.stopwatch()
    env = harness.environment()
    record = {
        "command": " ".join(["bench/bench_permutation.py", *sys.argv[1:]]),
        "torch": env["torch"],
        "machine": env["machine"],
        "threads": 1,
        "pattern": f"{args.n}:{args.m}",
        "metric": "fraction of the weights' total |w| kept by N:M magnitude pruning",
        "lenet5-fashion": lenet5(args.n, args.m, args.seed),
        "minilm": minilm(args.n, args.m, args.seed),
    }
    record["total_seconds"] = round(wall.seconds, 1)
    record["environment"] = env
    harness.write_result(args.out, record)
    for model in ("lenet5-fashion", "minilm"):
        for key, value in record[model].items():
            if key.endswith("summary"):
                print(model, key, json.dumps(value))


if __name__ == "__main__":
    main()
