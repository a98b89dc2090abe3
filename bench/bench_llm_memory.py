"""Compress a 4 GB (fp32) Llama-style checkpoint with ``--max-memory 1GB``; kill it halfway and
resume; compare with the in-memory run.

    .venv/bin/python bench/bench_llm_memory.py [--layers 20 --hidden 2048 --samples 16]

1. A randomly initialised LlamaForCausalLM (grouped-query attention) of at least 4 GB in fp32 is
   written with save_pretrained in 500 MB shards (seeded).
2. ``slimtorch compress --model DIR --recipe RECIPE --data builtin:austen --max-memory 1GB``
   runs under ``/usr/bin/time -v``: peak resident memory ("Maximum resident set size").
3. The same command is killed (SIGKILL) once half of the blocks are done, then run again: it
   resumes from the last finished block. Its artifact must equal run 2's part for part.
4. The in-memory run (no --max-memory) must give the same tensors, part for part.

Results: bench/results/llm_memory.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

import harness

RESULTS = harness.result_path("llm_memory.json")
PYTHON = sys.executable


def make_checkpoint(path: Path, layers: int, hidden: int, seed: int) -> int:
    from transformers import LlamaConfig, LlamaForCausalLM

    if (path / "config.json").is_file():
        return sum(f.stat().st_size for f in path.glob("*.safetensors"))
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=32000, hidden_size=hidden, intermediate_size=int(hidden * 2.75),
        num_hidden_layers=layers, num_attention_heads=hidden // 128,
        num_key_value_heads=max(1, hidden // 512), max_position_embeddings=2048,
        tie_word_embeddings=False, use_cache=False,
    )  # fmt: skip
    with torch.device("cpu"):
        model = LlamaForCausalLM(config)
    model.save_pretrained(path, max_shard_size="500MB")
    del model
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def _command(ckpt: Path, out: Path, args: argparse.Namespace, offload: bool) -> list[str]:
    cmd = [
        PYTHON, "-m", "slimtorch.cli.main", "compress", "--model", str(ckpt), "--recipe",
        str(args.recipe_file), "--data", "builtin:austen", "--out", str(out), "--quiet",
        "--json",
    ]  # fmt: skip
    if offload:
        cmd += ["--max-memory", args.max_memory, "--work-dir", str(out) + ".work"]
    return cmd


def timed(cmd: list[str], env: dict[str, str]) -> dict[str, Any]:
    with harness.stopwatch() as sw:
        proc = subprocess.run(
            ["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, env=env, check=False
        )
    wall = sw.seconds
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd} failed:\n{proc.stderr[-3000:]}")
    return {"wall_s": wall, "max_rss_bytes": int(rss.group(1)) * 1024 if rss else None}


def killed_then_resumed(cmd: list[str], work: Path, blocks: int, env: dict[str, str]) -> dict:
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    done = -1
    while proc.poll() is None:
        progress = work / "progress.json"
        if progress.is_file():
            done = json.loads(progress.read_text())["done"]
            if done + 1 >= blocks // 2:
                proc.send_signal(signal.SIGKILL)
                break
        time.sleep(0.5)
    proc.wait()
    resumed = timed(cmd, env)
    return {"killed_after_blocks": done + 1, **resumed}


def same_parts(a: Path, b: Path) -> dict[str, Any]:
    """Compare every stored part of two artifacts, one tensor at a time."""
    with (
        safe_open(str(a / "model.safetensors"), "pt") as fa,
        safe_open(str(b / "model.safetensors"), "pt") as fb,
    ):
        ka, kb = set(fa.keys()), set(fb.keys())
        differ = [k for k in sorted(ka & kb) if not torch.equal(fa.get_tensor(k), fb.get_tensor(k))]
    return {"parts": len(ka), "same_names": ka == kb, "differing": differ[:10]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=20)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--max-memory", default="1GB")
    parser.add_argument("--method", default="quantize.gptq")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/slimtorch-bench-llm-memory"))
    parser.add_argument("--skip-in-memory", action="store_true")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    ckpt = args.workdir / "ckpt"
    ckpt_bytes = make_checkpoint(ckpt, args.layers, args.hidden, seed=0)
    args.recipe_file = args.workdir / "recipe.yaml"
    cal = f"{{samples: {args.samples}, batch_size: 4}}"
    if args.method == "quantize.rtn":  # data-free, still streamed block by block
        options = (
            "    bits: 4\n    signed: false\n    symmetric: false\n    granularity: per_group\n"
            "    group_size: 128\n    targets: [Linear]\n    ignore: [lm_head]\n"
        )
    else:
        options = f"    bits: 4\n    group_size: 128\n    calibration: {cal}\n"
    args.recipe_file.write_text(f"stages:\n  - method: {args.method}\n{options}")
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    result: dict[str, Any] = {"checkpoint_bytes": ckpt_bytes, "layers": args.layers,
                              "hidden": args.hidden, "samples": args.samples}  # fmt: skip
    for name in ("offloaded", "resumed", "in_memory"):
        shutil.rmtree(args.workdir / name, ignore_errors=True)
        shutil.rmtree(args.workdir / f"{name}.work", ignore_errors=True)
    result["offloaded"] = timed(_command(ckpt, args.workdir / "offloaded", args, True), env)
    print(json.dumps(result), flush=True)
    cmd = _command(ckpt, args.workdir / "resumed", args, True)
    result["resumed"] = killed_then_resumed(cmd, args.workdir / "resumed.work", args.layers, env)
    result["resumed_vs_offloaded"] = same_parts(
        args.workdir / "offloaded", args.workdir / "resumed"
    )
    print(json.dumps(result), flush=True)
    if not args.skip_in_memory:
        cmd = _command(ckpt, args.workdir / "in_memory", args, False)
        result["in_memory"] = timed(cmd, env)
        result["in_memory_vs_offloaded"] = same_parts(
            args.workdir / "offloaded", args.workdir / "in_memory"
        )
    elif RESULTS.is_file():  # keep the earlier in-memory comparison, marked as such
        earlier = harness.read_result(RESULTS, {})
        for key in ("in_memory", "in_memory_vs_offloaded"):
            if key in earlier:
                result[f"earlier_{key}"] = {**earlier[key], "command": earlier.get("command")}
    env = harness.environment()
    result.update(command=env["command"], machine=env["machine"], torch=env["torch"])
    result["environment"] = env
    harness.write_result(RESULTS, result, indent=2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
