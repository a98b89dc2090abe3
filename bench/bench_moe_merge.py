"""Expert merging vs dropping (``prune.experts`` ``mode: merge`` vs ``mode: drop``): the relative
error of every MoE layer's output against the unpruned layer's, on held-out tokens.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_moe_merge.py [--seeds 6]

Two setups, both random-init (no pretrained MoE installs here, so neither says anything about
the quality of a real model):

- ``paired``: tiny Mixtral models (2 layers, 8 experts, top-1 and top-2) whose experts come in
  similar pairs (tests/prune/test_experts_merge_error.py builds them), random token ids;
- ``random``: a random-init Qwen3-MoE (2 layers, hidden 256, 16 experts, top-4) calibrated and
  measured on builtin:austen text (austen-lm tokenizer): unrelated experts, the case merging is
  not made for.

Error: ``||y_pruned - y||^2 / ||y||^2`` of each MoE block fed the unpruned model's inputs, summed
over layers. Results: bench/results/moe_merge.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

import harness

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "prune"))
from test_experts_merge_error import compare, layer_errors

RESULTS = harness.result_path("moe_merge.json")
VARIANTS: dict[str, dict[str, Any]] = {
    "drop": {"mode": "drop"},
    "merge": {"mode": "merge"},  # default min_similarity 0.0
    "merge-min0.3": {"mode": "merge", "min_similarity": 0.3},
    "merge-uniform": {"mode": "merge", "merge_weights": "uniform"},
}


def random_qwen(fraction: float, samples: int) -> dict[str, float]:
    import transformers

    import slimtorch as st
    from slimtorch.calibrate.text import TOKEN_WINDOWS, tokenizer_file
    from slimtorch.core.info import update_info
    from slimtorch.testing.tasks import tensor_task

    tok = tokenizer_file("builtin:austen-lm")
    vocab = json.loads(tok.read_text(encoding="utf-8"))["model"]["vocab"]
    torch.manual_seed(0)
    config = transformers.Qwen3MoeConfig(
        vocab_size=len(vocab), hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
        num_experts=16, num_experts_per_tok=4, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=64, max_position_embeddings=256, use_cache=False,
        norm_topk_prob=True,
    )  # fmt: skip
    model = transformers.Qwen3MoeForCausalLM(config).eval()
    arch = {"kind": "hf", "class": "Qwen3MoeForCausalLM", "config": config.to_dict()}
    update_info(model, architecture={**arch, "attn_implementation": "sdpa", "dtype": "float32"})
    calib = TOKEN_WINDOWS.get("train")("builtin:austen", tok, samples, 128)
    held = TOKEN_WINDOWS.get("heldout")("builtin:austen", tok, 8, 128)
    task: Any = tensor_task(calib, loss="next_token")
    out = {}
    for name, options in VARIANTS.items():
        stage = {"method": "prune.experts", "fraction": fraction, **options,
                 "calibration": {"samples": samples, "batch_size": 4}}  # fmt: skip
        pruned = st.compress(model, {"stages": [stage]}, data=task).model
        out[name] = round(sum(layer_errors(model, pruned, held)), 4)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=6)
    parser.add_argument("--samples", type=int, default=16)
    args = parser.parse_args()
    result: dict[str, Any] = {"paired": {}, "random": {}}
    for top_k in (1, 2):
        for fraction in (0.25, 0.5):
            runs = [compare(s, fraction, top_k) for s in range(args.seeds)]
            row = {
                "drop": [round(r["drop"], 4) for r in runs],
                "merge": [round(r["merge"], 4) for r in runs],
                "merge_wins": sum(r["merge"] < r["drop"] for r in runs),
            }
            result["paired"][f"top{top_k}-{fraction}"] = row
            print("paired", top_k, fraction, json.dumps(row), flush=True)
    for fraction in (0.25, 0.5):
        result["random"][str(fraction)] = random_qwen(fraction, args.samples)
        print("random", fraction, json.dumps(result["random"][str(fraction)]), flush=True)
    harness.save_result(RESULTS, result)


if __name__ == "__main__":
    main()
