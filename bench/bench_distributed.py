"""Data-parallel calibration on torch.distributed: wall time with 1 and N processes, the bytes
each rank sends per block, and whether the result is the same bits (issue 16 point 4).

    .venv/bin/python bench/bench_distributed.py [--nproc 2] [--models austen-lm llama-1b-2l]
        [--sum-dtype float64|float32]

For each model, ``st.compress(model, w4a16-gptq)`` is timed (calibration + GPTQ only: no model
load, no evaluation, no saving) in one plain process and under ``torchrun --standalone
--nproc_per_node N`` (gloo, one thread per process). Every run prints the SHA-256 of the
compressed model's state dict (weights and quantization states), so the table says whether N
processes gave exactly the single-process bits. ``--sum-dtype float32`` sets every stage's
``calibration.sum_dtype``: the Hessian sums are kept and sent in float32 (half the bytes per
block; not bit-exact, docs/distributed.md), results in bench/results/distributed_float32.json.

* ``austen-lm``: builtin:austen-lm (4 layers, hidden 256), builtin:austen text, the preset's
  128 windows in batches of 8;
* ``llama-1b-2l``: a random-init Llama-3.2-1B-shaped config (hidden 2048, MLP 8192, 32/8 heads)
  cut to 2 layers, vocabulary 32,000, 16 windows of 256 random token ids (seed 0), batch 4.

On this 2-core machine the ideal for 2 processes is 2x (both the forward passes and the GPTQ
solves are split); other jobs on the machine move single runs by tens of percent. Results:
bench/results/distributed.json.

    .venv/bin/python bench/bench_distributed.py --offloaded [--nproc 2] [--samples 32]

runs ``slimtorch compress --model builtin:smollm2-135m --recipe w4a16-gptq (calibration
--samples in batches of 8) --data builtin:wikipedia --max-memory 1GB`` (offloaded, block by
block) as one process and with ``--nproc N`` (each rank a torchrun worker, one thread each):
wall time of the whole command, each process's peak resident memory (its own ``ru_maxrss``),
and the SHA-256 of the artifact's model.safetensors. Results:
bench/results/distributed_offloaded.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import harness

RESULTS = harness.result_path("distributed.json")
MODELS = ("austen-lm", "llama-1b-2l")


def preset(sum_dtype: str) -> dict[str, Any]:
    """The w4a16-gptq preset with ``calibration.sum_dtype`` set on its calibrated stage."""
    import yaml

    import slimtorch.recipe

    path = Path(slimtorch.recipe.__file__).parent / "presets" / "w4a16-gptq.yaml"
    rec: dict[str, Any] = yaml.safe_load(path.read_text())
    rec["stages"][0]["calibration"]["sum_dtype"] = sum_dtype
    return rec


def build(name: str, sum_dtype: str = "float64") -> tuple[Any, Any, Any]:
    """``(model, recipe, task)`` of a benchmark model."""
    import torch

    from slimtorch.calibrate.lm import CausalLMTask

    rec = preset(sum_dtype)
    if name == "austen-lm":
        from slimtorch.calibrate.tasks import make_task
        from slimtorch.calibrate.text import model_tokenizer
        from slimtorch.models.registry import load_model

        loaded = load_model("builtin:austen-lm")
        tok = model_tokenizer("builtin:austen-lm", loaded.tokenizer, None)
        return loaded.model, rec, make_task(loaded.task or "causal-lm", "builtin:austen", tok)
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=2048, intermediate_size=8192, num_hidden_layers=2, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=32000, max_position_embeddings=1024,
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(
        0, config.vocab_size, (16 * 256,), generator=torch.Generator().manual_seed(0)
    )
    rec["stages"][0]["calibration"].update(samples=16, batch_size=4)
    return model, rec, CausalLMTask(ids, window=256)


def digest(model: Any) -> str:
    """SHA-256 over the state dict and every quantization state's tensors, in name order."""
    import torch

    from slimtorch.formats.state import iter_states

    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().contiguous().view(torch.uint8).numpy().tobytes())
    for name, _, param, state in sorted(iter_states(model), key=lambda item: (item[0], item[2])):
        for key, value in sorted(vars(state).items()):
            if isinstance(value, torch.Tensor):
                h.update(f"{name}.{param}.{key}".encode())
                h.update(value.detach().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def child(name: str, sum_dtype: str) -> None:
    """One process (or one rank under torchrun): time the compression, print a RESULT line."""
    import torch

    import slimtorch as st
    from slimtorch.calibrate import distributed

    torch.set_num_threads(1)
    comm = distributed.init_from_env("cpu") if distributed.launched() else None
    model, recipe, task = build(name, sum_dtype)
    if comm is not None:
        comm.barrier()
    start = time.perf_counter()
    result = st.compress(model, recipe, task)
    if comm is not None:
        comm.barrier()
    wall = time.perf_counter() - start
    traffic = distributed.traffic(comm) if comm is not None else None
    if comm is None or comm.rank == 0:
        row = {"model": name, "processes": comm.world if comm else 1, "sum_dtype": sum_dtype,
               "compress_s": round(wall, 2), "sha256": digest(result.model), "traffic": traffic}  # fmt: skip
        print("RESULT " + json.dumps(row), flush=True)
    if comm is not None:
        distributed.shutdown()


def run(name: str, nproc: int, sum_dtype: str) -> dict[str, Any]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    me = [str(Path(__file__).resolve()), "--child", name, "--sum-dtype", sum_dtype]
    if nproc == 1:
        cmd = [sys.executable, *me]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={nproc}", *me]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])  # type: ignore[no-any-return]
    tail = (done.stdout + done.stderr).strip().splitlines()[-5:]
    return {"model": name, "processes": nproc, "error": " | ".join(tail)}


def offload_child(argv: list[str]) -> None:
    """One process or one rank: ``slimtorch <argv>``, then this process's peak memory."""
    import resource

    from slimtorch.cli.main import main as cli

    code = cli(argv)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    row = {"rank": int(os.environ.get("RANK", "0")), "max_rss_bytes": peak, "code": code}
    print("PEAK " + json.dumps(row), flush=True)
    sys.exit(code)


def offloaded(nproc: int, samples: int, work: Path) -> dict[str, Any]:
    """``compress --max-memory 1GB`` of builtin:smollm2-135m on 1 and ``nproc`` processes."""
    import yaml

    import slimtorch.recipe

    preset = Path(slimtorch.recipe.__file__).parent / "presets" / "w4a16-gptq.yaml"
    rec: dict[str, Any] = yaml.safe_load(preset.read_text())
    rec["stages"][0]["calibration"] = {"samples": samples, "batch_size": 8}
    rec["description"] = f"w4a16-gptq on {samples} calibration sequences"
    work.mkdir(parents=True, exist_ok=True)
    (work / "recipe.yaml").write_text(yaml.safe_dump(rec))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    rows = []
    for n in (1, nproc):
        out = work / f"out{n}"
        argv = ["compress", "--model", "builtin:smollm2-135m", "--recipe",
                str(work / "recipe.yaml"), "--data", "builtin:wikipedia", "--max-memory", "1GB",
                "--out", str(out), "--work-dir", str(work / f"work{n}"), "--force", "--json"]  # fmt: skip
        me = [str(Path(__file__).resolve()), "--offload-child", *argv]
        launch = [] if n == 1 else ["-m", "torch.distributed.run", "--standalone",
                                    f"--nproc_per_node={n}"]  # fmt: skip
        start = time.perf_counter()
        done = subprocess.run([sys.executable, *launch, *me], capture_output=True, text=True,
                              env=env)  # fmt: skip
        wall = time.perf_counter() - start
        peaks = sorted(
            (json.loads(line[5:]) for line in done.stdout.splitlines() if line.startswith("PEAK ")),
            key=lambda r: r["rank"],
        )
        row: dict[str, Any] = {"processes": n, "wall_s": round(wall, 1), "code": done.returncode,
                               "peak_rss_mib_per_rank": [round(r["max_rss_bytes"] / 2**20)
                                                         for r in peaks]}  # fmt: skip
        model = out / "model.safetensors"
        if done.returncode == 0 and model.is_file():
            row["sha256"] = hashlib.sha256(model.read_bytes()).hexdigest()
        else:
            row["error"] = (done.stdout + done.stderr)[-2000:]
        print(json.dumps(row), flush=True)
        rows.append(row)
    same = len({r.get("sha256") for r in rows}) == 1 and "sha256" in rows[0]
    return {"model": "builtin:smollm2-135m", "samples": samples, "rows": rows,
            "same_sha256": same}  # fmt: skip


def main() -> None:
    if sys.argv[1:2] == ["--offload-child"]:
        offload_child(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--offloaded", action="store_true", help="smollm2 --max-memory 1GB")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--work", type=Path, default=Path("/tmp/slimtorch-bench-dist-offload"))
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--sum-dtype", choices=("float64", "float32"), default="float64",
                        help="calibration.sum_dtype: float32 halves the Hessian bytes")  # fmt: skip
    parser.add_argument("--child", choices=MODELS, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.sum_dtype)
        return
    if args.out is None:
        f32 = args.sum_dtype == "float32"
        args.out = harness.result_path("distributed_float32.json") if f32 else RESULTS
    if args.offloaded:
        result = offloaded(args.nproc, args.samples, args.work)
        result.update({"command": "python " + " ".join(sys.argv),
                       "environment": harness.environment()})  # fmt: skip
        harness.write_result(harness.result_path("distributed_offloaded.json"), result, indent=2)
        return
    rows = []
    for name in args.models:
        for n in (1, args.nproc):
            row = run(name, n, args.sum_dtype)
            print(json.dumps({k: v for k, v in row.items() if k != "traffic"}), flush=True)
            rows.append(row)
    for name in args.models:
        one = next((r for r in rows if r["model"] == name and r["processes"] == 1), {})
        for r in rows:
            if r["model"] == name and r["processes"] != 1 and "compress_s" in r and one:
                r["speedup"] = round(one["compress_s"] / r["compress_s"], 2)
                r["same_bits_as_one_process"] = r["sha256"] == one.get("sha256")
    result = {"command": "python " + " ".join(sys.argv), "rows": rows,
              "environment": harness.environment()}  # fmt: skip
    harness.write_result(args.out, result, indent=2)
    for r in rows:
        sent = r.get("traffic") or {}
        per_block = sent.get("bytes_sent_per_block")
        print(r["model"], r["processes"], r.get("compress_s"), r.get("speedup"),
              r.get("same_bits_as_one_process"), per_block and [b[0] for b in per_block])  # fmt: skip


if __name__ == "__main__":
    main()
