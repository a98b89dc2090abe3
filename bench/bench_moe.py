"""Mixture-of-experts compression on a random-init Qwen3-MoE checkpoint (issue 17 point 1).

    .venv/bin/python bench/bench_moe.py [--layers 4 --hidden 1024 --experts 32 --top-k 4 --samples 8]

The vocabulary is SmolLM2's (49,152): calibration text is tokenized with builtin:smollm2-135m.


No pretrained MoE model installs here, so the weights are random (seeded): the figures are
coverage, bytes, time and memory, not quality. transformers v5 stores each layer's experts as
fused 3-D parameters; slimtorch runs them as one Linear per expert. Every row is one
``slimtorch compress --model DIR --recipe R --data builtin:austen --json`` command under
``/usr/bin/time -v`` (wall time, peak resident memory; ``--llm-windows 0``: perplexity of random
weights says nothing), then its artifact's manifest is read:

- how many expert matrices hold compressed weights (out of layers x experts x 3), and how many
  experts no calibration token reached (``data_free_layers``: compressed data-free, RTN for GPTQ)
  with and without ``calibrate_all_experts``;
- bytes on disk against the fp32 checkpoint;
- for ``prune.experts`` (REAP, 25% of the experts) + RTN: ``export --to hf`` reloads in
  transformers with the logits of ``slimtorch.load`` (max abs difference) and the expert count;
- for AWQ: in how many layers the experts' scaling group was folded (the norm before the experts
  differs from the checkpoint's; the router took the same scales, unquantized).

Also the forward time of 4 x 128 tokens of the checkpoint in transformers (fused experts) and
after slimtorch unfused them (same logits): the per-expert Linears cost no speed.
Results: bench/results/moe.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

import harness

RESULTS = harness.result_path("moe.json")


def make_checkpoint(path: Path, args: argparse.Namespace) -> int:
    import transformers

    if not (path / "config.json").is_file():
        torch.manual_seed(0)
        config = transformers.Qwen3MoeConfig(
            vocab_size=49152, hidden_size=args.hidden, intermediate_size=args.hidden * 3,
            moe_intermediate_size=args.hidden // 2, num_experts=args.experts,
            num_experts_per_tok=args.top_k, num_hidden_layers=args.layers,
            num_attention_heads=args.hidden // 128, num_key_value_heads=max(1, args.hidden // 512),
            head_dim=128, max_position_embeddings=2048, use_cache=False, norm_topk_prob=True,
        )  # fmt: skip
        model = transformers.Qwen3MoeForCausalLM(config)
        model.save_pretrained(path, max_shard_size="500MB")
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def recipes(work: Path, samples: int) -> dict[str, Path]:
    cal = f"{{samples: {samples}, batch_size: 4}}"
    gptq = "  - method: quantize.gptq\n    bits: 4\n    group_size: 128\n"
    awq = "  - method: quantize.awq\n    bits: 4\n    group_size: 128\n"
    rtn = (
        "  - method: quantize.rtn\n    bits: 4\n    signed: false\n    symmetric: false\n"
        "    granularity: per_group\n    group_size: 128\n    targets: [Linear]\n"
        "    ignore: [lm_head, re:.*mlp\\.gate$]\n"
    )
    texts = {
        "rtn-w4": f"stages:\n{rtn}",
        "gptq-w4": f"stages:\n{gptq}    calibration: {cal}\n",
        "gptq-w4-all-experts": f"stages:\n{gptq}    calibration: {{samples: {samples},"
        " batch_size: 4, calibrate_all_experts: true}\n",
        "awq-w4": f"stages:\n{awq}    calibration: {cal}\n",
        "reap25-rtn-w4": f"stages:\n  - method: prune.experts\n    fraction: 0.25\n"
        f"    calibration: {cal}\n{rtn}",
    }
    out = {}
    for name, text in texts.items():
        (work / f"{name}.yaml").write_text(text)
        out[name] = work / f"{name}.yaml"
    return out


def compress(ckpt: Path, recipe: Path, out: Path) -> dict[str, Any]:
    cmd = [
        sys.executable, "-m", "slimtorch.cli.main", "compress", "--model", str(ckpt),
        "--recipe", str(recipe), "--data", "builtin:austen", "--tokenizer", "builtin:smollm2-135m",
        "--out", str(out), "--llm-windows", "0", "--quiet",
        "--json", "--force",
    ]  # fmt: skip
    with harness.stopwatch() as sw:
        proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    return {
        "wall_s": round(sw.seconds, 1),
        "max_rss_bytes": int(rss.group(1)) * 1024 if rss else None,
    }


def coverage(out: Path, args: argparse.Namespace) -> dict[str, Any]:
    from slimtorch.formats.artifact import read_manifest

    manifest = read_manifest(out)
    meta = manifest.get("metadata", {})
    states = json.dumps(manifest)
    experts = len(set(re.findall(r"layers\.\d+\.mlp\.experts\.\d+\.\w+_proj\.weight", states)))
    return {
        "artifact_bytes": sum(f.stat().st_size for f in out.iterdir() if f.is_file()),
        "expert_matrices_compressed": experts,
        "data_free_layers": len(meta.get("data_free_layers") or []),
    }


def norms_scaled(out: Path, ckpt: Path) -> dict[str, Any]:
    """Layers whose ``post_attention_layernorm`` (the experts' AWQ group) took scales."""
    from safetensors import safe_open

    from slimtorch.formats.artifact import read_artifact

    tensors = read_artifact(out).tensors
    changed = 0
    for file in ckpt.glob("*.safetensors"):
        with safe_open(str(file), "pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                if key.endswith("post_attention_layernorm.weight"):
                    changed += not torch.equal(f.get_tensor(key).float(), tensors[key].float())
    return {"awq_layers_with_expert_scales": changed}


def hf_reload(out: Path, work: Path) -> dict[str, Any]:
    import transformers

    import slimtorch as st
    from slimtorch.export import export

    loaded = st.load(out)
    hf_dir = work / "reap-hf"
    shutil.rmtree(hf_dir, ignore_errors=True)
    export(loaded, to="hf", out=hf_dir)
    again = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    ids = torch.randint(0, 49152, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (again(ids).logits - loaded(ids).logits).abs().max()
    return {"hf_max_abs_logit_diff": float(diff), "hf_num_experts": again.config.num_experts}


def forward_speed(ckpt: Path) -> dict[str, Any]:
    import transformers

    from slimtorch.runtime.moe import unfuse_experts

    model = transformers.AutoModelForCausalLM.from_pretrained(ckpt).eval()
    ids = torch.randint(0, 49152, (4, 128), generator=torch.Generator().manual_seed(0))

    def run() -> torch.Tensor:
        with torch.no_grad():
            return model(ids).logits  # type: ignore[no-any-return]

    fused_logits, fused = harness.timed(run, repeats=3)
    unfuse_experts(model)
    unfused_logits, unfused = harness.timed(run, repeats=3)
    return {
        "fused_ms_median": round(fused.median, 1),
        "unfused_ms_median": round(unfused.median, 1),
        "max_abs_logit_diff": float((fused_logits - unfused_logits).abs().max()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--top-k", type=int, default=4)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--rows", nargs="*", default=None)
    parser.add_argument("--work", type=Path, default=Path("/tmp/slimtorch-bench-moe"))
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    ckpt = args.work / "ckpt"
    result: dict[str, Any] = {
        "checkpoint_bytes": make_checkpoint(ckpt, args),
        "shape": {k: getattr(args, k) for k in ("layers", "hidden", "experts", "top_k")},
        "expert_matrices": args.layers * args.experts * 3,
        "samples": args.samples,
        "threads": os.environ.get("OMP_NUM_THREADS"),
        "rows": {},
    }
    before = harness.read_result(RESULTS, {})
    same = all(before.get(k) == result[k] for k in ("shape", "samples"))
    if args.rows and same:  # a few rows again: keep the others
        result["rows"] = before.get("rows", {})
    result["forward"] = forward_speed(ckpt)
    print(json.dumps(result["forward"]), flush=True)
    for name, recipe in recipes(args.work, args.samples).items():
        if args.rows and name not in args.rows:
            continue
        out = args.work / name
        row = {**compress(ckpt, recipe, out), **coverage(out, args)}
        if name.startswith("reap"):
            row.update(hf_reload(out, args.work))
        if name.startswith("awq"):
            row.update(norms_scaled(out, ckpt))
        result["rows"][name] = row
        print(name, json.dumps(row), flush=True)
        harness.save_result(RESULTS, result)
    harness.save_result(RESULTS, result)


if __name__ == "__main__":
    main()
