"""LLM compression side by side with the papers' own code and the installable peers, on
builtin:austen-lm: same model, same calibration tokens, same settings, same perplexity function.

    .venv/bin/python bench/bench_llm_peers.py --peers-dir /tmp/peers \\
        --peers-python /tmp/peers-venv/bin/python [--methods gptq-w4 ...] [--impls ours papers ...]

Rows: GPTQ 4 and 3 bits (groups of 128, asymmetric, act_order with static groups), SparseGPT
50% and 2:4, Wanda 50% and 2:4 (every Linear of the decoder blocks; the tied LM head stays
fp32). Implementations:

* ``ours``: slimtorch's recipe stage via ``slimtorch.compress`` (bench/peer_ours.py);
* ``papers``: IST-DASLab/gptq, IST-DASLab/sparsegpt, locuslab/wanda from their checkouts under
  ``--peers-dir`` (fetched, never part of this repository), driven by their ``llama.py`` loop,
  patched at run time only to run on the CPU (bench/peer_papers.py says exactly what);
* ``gptqmodel`` (GPTQ only) and ``llmcompressor``: the PyPI packages in a separate virtualenv
  (``--peers-python``) that sees this one's torch (bench/peer_gptqmodel.py,
  bench/peer_llmcompressor.py).

The calibration set is drawn once (``--samples`` windows of 256 tokens of the Austen+Wikipedia
training split, seed ``--seed``: exactly the windows bench_llm.py's stages draw) and saved to
``--work``/calib.safetensors; the held-out ids (the GPTQ-protocol evaluator's, 126,070 tokens)
to heldout.safetensors. Every (method, implementation) runs in its own process with
``--threads`` threads (gptqmodel: ``GPTQMODEL_CPU_WORKERS=--gptqmodel-workers``, default 2, the
least its CPU pool accepts), times only its compression call, and scores the result with
``slimtorch.eval.perplexity.perplexity_of_ids`` on those ids. Methods run one after another,
each method's implementations back to back, so they see the same machine load.

Results: bench/results/llm_peers.json; ``--markdown FILE`` writes the table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
import harness
from peer_common import (
    METHODS,
    heldout_ids,
    load_builtin,
    load_ids,
    make_calibration,
    perplexity,
    save_ids,
)

RESULTS = harness.result_path("llm_peers.json")
HERE = Path(__file__).parent
RUNNERS = {
    "ours": ("peer_ours.py", False),
    "papers": ("peer_papers.py", False),
    "gptqmodel": ("peer_gptqmodel.py", True),
    "llmcompressor": ("peer_llmcompressor.py", True),
}
SUPPORTS = {"gptqmodel": {"gptq"}}
# the fetched checkouts (github:IST-DASLab/gptq, github:IST-DASLab/sparsegpt, github:locuslab/wanda)
PAPER_COMMITS = {
    "IST-DASLab/gptq": "2d65066eeb06a5c9ff5184d8cebdf33662c67faf",
    "IST-DASLab/sparsegpt": "147d2159dc4f3e9f73e47b32c04d7b3708f44436",
    "locuslab/wanda": "8e8fc87b4a2f9955baa7e76e64d5fce7fa8724a6",
}


def command(impl: str, method: str, args: argparse.Namespace, files: dict[str, Path]) -> list[str]:
    script, peers_venv = RUNNERS[impl]
    python = str(args.peers_python) if peers_venv else sys.executable
    cmd = [python, str(HERE / script), method, "--calib", str(files["calib"]),
           "--heldout", str(files["heldout"]), "--threads", str(args.threads),
           "--batch-size", str(args.batch_size), "--peers-dir", str(args.peers_dir)]  # fmt: skip
    if args.profile_dir is not None and impl in args.profile:
        cmd += ["--profile", str(args.profile_dir / f"{impl}_{method}.prof")]
    return cmd


def run(cmd: list[str], threads: int, log: Path, workers: int) -> dict[str, Any]:
    """One runner process; its ``RESULT`` row, or an ``error`` with the output's last lines."""
    env = {**os.environ, "GPTQMODEL_CPU_WORKERS": str(workers), "OMP_NUM_THREADS": str(threads)}
    with harness.stopwatch() as sw:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    log.write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            row: dict[str, Any] = json.loads(line[len("RESULT ") :])
            row["process_seconds"] = round(sw.seconds, 1)
            return row
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-12:]
    return {"error": f"exit {proc.returncode}", "output_tail": tail}


def prepare(args: argparse.Namespace) -> tuple[dict[str, Path], float]:
    args.work.mkdir(parents=True, exist_ok=True)
    files = {"calib": args.work / "calib.safetensors", "heldout": args.work / "heldout.safetensors"}
    save_ids(make_calibration(args.samples, args.seed), files["calib"])
    save_ids(heldout_ids(), files["heldout"])
    return files, perplexity(load_builtin(), load_ids(files["heldout"], 1))


def table(rows: list[dict[str, Any]], fp32: float) -> str:
    header = ["method", "implementation", "perplexity", "ppl / ours", "compression s", "s / ours"]
    cells = []
    for r in rows:
        if "error" in r:
            cells.append([r["method"], r["implementation"], f"failed: {r['error']}"])
            continue
        cells.append(
            [r["method"], r["implementation"], f"{r['perplexity']:.2f}",
             f"{r.get('ppl_ratio', float('nan')):.4f}", f"{r['seconds']:.1f}",
             f"{r.get('time_ratio', float('nan')):.2f}"]
        )  # fmt: skip
    table = harness.markdown_table(header, cells, "llrrrr")
    return f"fp32: perplexity {fp32:.2f}\n\n{table}\n"


def _ratios(rows: list[dict[str, Any]]) -> None:
    ours = {r["key"]: r for r in rows if r.get("implementation") == "slimtorch"}
    for r in rows:
        base = ours.get(r.get("key", ""))
        if base is not None and "error" not in r:
            r["ppl_ratio"] = r["perplexity"] / base["perplexity"]
            r["time_ratio"] = r["seconds"] / base["seconds"]


def _impl(row: dict[str, Any]) -> str:
    """The runner name of a row (rows of older runs name only the implementation)."""
    name = str(row.get("impl") or row["implementation"])
    for impl, prefix in (("ours", "slimtorch"), ("papers", "IST-DASLab"), ("papers", "locuslab"),
                         ("gptqmodel", "gptqmodel"), ("llmcompressor", "llm-compressor")):  # fmt: skip
        if name.startswith(prefix):
            return impl
    return name


def versions(peers_python: Path) -> dict[str, str]:
    code = ("import importlib.metadata as m\nfor p in ('gptqmodel', 'llmcompressor',"
            " 'compressed-tensors', 'transformers', 'torch'):\n"
            "    try: print(p, m.version(p))\n    except Exception as e: print(p, 'missing')")  # fmt: skip
    proc = subprocess.run([str(peers_python), "-c", code], capture_output=True, text=True)
    found = dict(line.split(" ", 1) for line in proc.stdout.splitlines() if " " in line)
    return {f"peers-venv {k}": v for k, v in found.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--peers-dir", type=Path, default=Path("/tmp/peers"))
    parser.add_argument("--peers-python", type=Path, default=Path("/tmp/peers-venv/bin/python"))
    parser.add_argument("--methods", nargs="+", choices=sorted(METHODS), default=list(METHODS))
    parser.add_argument("--impls", nargs="+", choices=list(RUNNERS), default=list(RUNNERS))
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument(
        "--gptqmodel-workers", type=int, default=2,
        help="GPTQMODEL_CPU_WORKERS (modules gptqmodel quantizes at once; it needs 2 on CPU)",
    )  # fmt: skip
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench-llm-peers"))
    parser.add_argument("--profile-dir", type=Path, default=None)
    parser.add_argument("--profile", nargs="*", default=["ours"], help="impls to cProfile")
    parser.add_argument("--markdown", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--merge", action="store_true", help="keep --out's other rows; replace same method+impl"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.profile_dir is not None:
        args.profile_dir.mkdir(parents=True, exist_ok=True)
    files, fp32 = prepare(args)
    print(json.dumps({"fp32_perplexity": fp32}), flush=True)
    rows: list[dict[str, Any]] = []
    commands = ["python " + " ".join(sys.argv)]
    if args.merge and args.out.exists():
        previous = harness.read_result(args.out, {})
        commands = previous.get("commands", [previous["command"]]) + commands
        wanted = {(k, i) for k in args.methods for i in args.impls}
        rows = [r for r in previous["rows"] if (r["key"], _impl(r)) not in wanted]
    env = harness.environment()
    result: dict[str, Any] = {
        "command": commands[-1],
        "commands": commands,  # every run merged into this file, in order
        "fp32_perplexity": fp32,
        "samples": args.samples,
        "seed": args.seed,
        "threads": args.threads,
        "batch_size": args.batch_size,
        "gptqmodel_cpu_workers": args.gptqmodel_workers,
        "machine": env["machine"],
        "torch": env["torch"],
        "paper_commits": PAPER_COMMITS,
        "versions": versions(args.peers_python) if args.peers_python.exists() else {},
        "rows": rows,
        "environment": env,
    }
    for key in args.methods:
        for impl in args.impls:
            if METHODS[key].kind not in SUPPORTS.get(impl, {METHODS[key].kind}):
                continue
            cmd = command(impl, key, args, files)
            row = run(cmd, args.threads, args.work / f"{impl}_{key}.log", args.gptqmodel_workers)
            row.setdefault("method", METHODS[key].label)
            row.setdefault("implementation", impl)
            row.setdefault("key", key)
            row["impl"] = impl
            row["command"] = " ".join(cmd)
            rows.append(row)
            rows.sort(key=lambda r: (list(METHODS).index(r["key"]), list(RUNNERS).index(_impl(r))))
            print(json.dumps({k: v for k, v in row.items() if k != "settings"}), flush=True)
            _ratios(rows)
            harness.write_result(args.out, result, indent=2)  # after every row
            if args.markdown is not None:
                args.markdown.write_text(table(rows, fp32))


if __name__ == "__main__":
    main()
