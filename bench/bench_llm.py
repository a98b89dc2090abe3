"""LLM compression on builtin:austen-lm: perplexity of every method, and the loaded int4 model.

    .venv/bin/python bench/bench_llm.py [--only table|decode] [--samples 128]

table: held-out Austen perplexity (GPTQ protocol: non-overlapping windows of the model's
context) of the fp32 model and of RTN, GPTQ and AWQ at 4 and 3 bits (groups of 128 input
columns), SparseGPT / Wanda / magnitude at 50% and 2:4 (every Linear of the decoder blocks; the
LM head stays dense), and W8A8 with and without SmoothQuant (alpha 0.5). Calibration: `--samples`
windows of 256 tokens of the Austen+Wikipedia training split (the held-out split is never seen).
Each row is the artifact written by `slimtorch.save` and loaded back with `slimtorch.load`;
bytes on disk and compression wall time are reported.

decode: the w4a16-gptq artifact loaded with `slimtorch.load(dir, kernels=True)` (int4 CPU
kernel) against the fp32 model: bytes on disk against the model's fp16 safetensors, resident
weight bytes, greedy decoding tokens per second at batch 1 (one thread, KV cache on), and
perplexity of the kernel-run model.

Results: bench/results/llm.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

import harness
import slimtorch as st
from slimtorch.api import artifact_size, get_metadata, set_architecture
from slimtorch.calibrate.tasks import make_task
from slimtorch.core.context import Context
from slimtorch.formats.sizes import dense_safetensors_bytes
from slimtorch.models.registry import load_model

RESULTS = harness.result_path("llm.json")
BLOCKS = "re:model\\.layers\\..*"


def _model() -> nn.Module:
    loaded = load_model("builtin:austen-lm")
    set_architecture(loaded.model, loaded.architecture)
    get_metadata(loaded.model).update(
        {"source": "builtin:austen-lm", "evaluator": loaded.evaluator, "data": loaded.data}
    )
    return loaded.model


def rows(samples: int, group: int) -> dict[str, dict[str, Any]]:
    cal = {"samples": samples, "batch_size": 8}

    def one(method: str, **options: Any) -> dict[str, Any]:
        return {"stages": [{"method": method, **options}]}

    grid = {"symmetric": False, "granularity": "per_group", "group_size": group}
    out: dict[str, dict[str, Any]] = {}
    for bits in (4, 3):
        rtn = {**grid, "signed": False, "targets": [BLOCKS]}
        out[f"RTN w{bits} g{group}"] = one("quantize.rtn", bits=bits, **rtn)
        out[f"GPTQ w{bits} g{group}"] = one(
            "quantize.gptq", bits=bits, calibration=cal, act_order=True, **grid
        )
        out[f"AWQ w{bits} g{group}"] = one(
            "quantize.awq", bits=bits, group_size=group, calibration=cal
        )
    for label, nm in (("50%", {"sparsity": 0.5}), ("2:4", {"n": 2, "m": 4})):
        out[f"SparseGPT {label}"] = one("prune.sparsegpt", calibration=cal, **nm)
        out[f"Wanda {label}"] = one("prune.wanda", calibration=cal, **nm)
        if label == "50%":
            out["magnitude 50%"] = one("prune.magnitude", sparsity=0.5, targets=[BLOCKS])
        else:
            out["magnitude 2:4"] = one("prune.nm", n=2, m=4, targets=[BLOCKS])
    int8 = {"method": "quantize.dynamic_int8", "targets": ["Linear"], "ignore": ["lm_head"],
            "embeddings": False}  # fmt: skip
    out["W8A8 dynamic int8"] = {"stages": [int8]}
    smooth = {"method": "quantize.smoothquant", "alpha": 0.5, "calibration": cal}
    out["SmoothQuant W8A8"] = {"stages": [smooth, int8]}
    return out


def table(samples: int, group: int, ctx: Context) -> dict[str, Any]:
    model = _model()
    task = make_task("causal-lm", None)
    fp32 = st.evaluate(model, ctx=ctx)["value"]
    dense = dense_safetensors_bytes(model.state_dict())
    results: list[dict[str, Any]] = [{"case": "fp32", "perplexity": fp32, "bytes": dense}]
    print(json.dumps(results[0]), flush=True)
    with tempfile.TemporaryDirectory(prefix="slimtorch-bench-llm-") as tmp:
        for label, recipe in rows(samples, group).items():
            with harness.stopwatch() as sw:
                compressed = st.compress(model, recipe, data=task, ctx=ctx).model
            seconds = sw.seconds
            path = Path(tmp) / label.replace(" ", "_").replace(":", "of").replace("%", "")
            st.save(compressed, path)
            loaded = st.load(path)
            row = {
                "case": label,
                "perplexity": st.evaluate(loaded, ctx=ctx)["value"],
                "bytes": artifact_size(path),
                "seconds": round(seconds, 1),
                "recipe": recipe,
            }
            results.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "recipe"}), flush=True)
    return {"rows": results, "samples": samples, "group_size": group}


def _decode_tps(model: nn.Module, tokens: int) -> float:
    ids = torch.randint(0, 1000, (1, 32), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=4, do_sample=False)  # warm-up
        with harness.stopwatch() as sw:
            model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
    return tokens / sw.seconds


def _resident(model: nn.Module) -> int:
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def decode(samples: int, group: int, tokens: int, ctx: Context) -> dict[str, Any]:
    model = _model()
    task = make_task("causal-lm", None)
    fp16 = dense_safetensors_bytes({k: v.half() for k, v in model.state_dict().items()})
    cal = {"samples": samples, "batch_size": 8}
    recipe = {"stages": [{"method": "quantize.gptq", "bits": 4, "group_size": group,
                          "act_order": True, "calibration": cal}]}  # fmt: skip
    q = st.compress(model, recipe, data=task, ctx=ctx).model
    out: dict[str, Any] = {"fp16_bytes": fp16}
    with tempfile.TemporaryDirectory(prefix="slimtorch-bench-llm-") as tmp:
        st.save(q, Path(tmp) / "q")
        out["int4_bytes"] = artifact_size(Path(tmp) / "q")
        fast = st.load(Path(tmp) / "q", kernels=True)
    model.generation_config.pad_token_id = 0
    fast.generation_config.pad_token_id = 0
    out["fp32_resident_bytes"] = _resident(model)
    out["int4_resident_bytes"] = _resident(fast)
    out["fp32_tokens_per_s"] = _decode_tps(model, tokens)
    out["int4_tokens_per_s"] = _decode_tps(fast, tokens)
    out["int4_kernel_perplexity"] = st.evaluate(fast, ctx=ctx)["value"]
    out["speedup"] = out["int4_tokens_per_s"] / out["fp32_tokens_per_s"]
    print(json.dumps(out), flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", choices=["table", "decode"], default=None)
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--group", type=int, default=128)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ctx = Context(progress=False)
    results = harness.read_result(RESULTS, {})
    env = harness.environment()
    meta = {
        "command": env["command"],
        "machine": env["machine"],
        "threads": args.threads,
        "torch": env["torch"],
        "environment": env,
    }
    if args.only in (None, "table"):
        results["table"] = {**table(args.samples, args.group, ctx), **meta}
    if args.only in (None, "decode"):
        results["decode"] = {**decode(args.samples, args.group, args.tokens, ctx), **meta}
    harness.write_result(RESULTS, results, indent=2)


if __name__ == "__main__":
    main()
