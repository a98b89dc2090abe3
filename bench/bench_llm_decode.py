"""LLM decoding speed on CPU: fp32, bf16, our int8 and int4 (kernels on), and llama.cpp.

    .venv-bench/bin/python bench/bench_llm_decode.py [--threads 1] [--repeats 3] [--quick]

Tokens per second of greedy decoding with the KV cache, 128 new tokens after a 64-token prompt
(random token ids, seed 0), the prefill left out: ``slimtorch.eval.decode.decode_tokens_per_s``
(the figure ``eval`` reports as ``tokens_per_s``), at batch 1 and batch 8, for two models:

* ``builtin:smollm2-135m`` (SmolLM2-135M-Instruct: 30 layers, hidden 576, tied 49152x576
  embedding / LM head);
* ``llama-1b-4l``: a random-init Llama-3.2-1B-shaped config (hidden 2048, intermediate 8192,
  32 heads / 8 KV heads) cut to 4 layers, vocabulary 49152 (SmolLM2's tokenizer, so that the
  GGUF export has one), untied LM head; ``torch.manual_seed(0)``.

Rows, each model built in memory from the same fp32 weights:

* ``fp32``: the transformers model as loaded; ``bf16``: ``model.to(torch.bfloat16)``;
* ``int8 (kernels)``: the ``int8`` preset (8-bit symmetric per-output-channel weights, every
  Linear and the embedding) with ``use_kernels``, as ``slimtorch.load(dir, kernels=True)`` does:
  every Linear on ``Int8WeightOnlyLinear`` (``torch.ops.aten._weight_int8pack_mm``, bf16
  activations; weight-only, W8A16);
* ``int4 (kernels)``: the ``w4a16-rtn`` preset (4-bit asymmetric groups, 8-bit per-row
  embedding and LM head) with ``use_kernels``: Linears on ``Int4WeightOnlyLinear`` (tinygemm
  ``_weight_int4pack_mm_for_cpu``), the LM head on ``Int8WeightOnlyLinear``;
* ``int4, 4-bit head (kernels)`` (untied LM heads only: the 1B config): ``w4a16-rtn`` with the
  LM head in the 4-bit stage as well, so it runs on the int4 kernel too (the embedding stays
  8-bit): what the 8-bit head costs;
* ``llama.cpp Q8_0`` / ``Q4_0``: GGUF files of the int8 model (its codes as Q8_0 blocks) and of
  the int4 model requantized to Q4_0 (``slimtorch.export.export(..., to="gguf",
  requantize="Q4_0")``; the 8-bit LM head / embedding stay Q8_0), or the files ``--gguf``
  names, run by llama-cpp-python with
  the same thread count, ``n_ctx=256``, greedy: the same prompt ids, 128 tokens, the rate of
  ``(128 - 1) / (full run - one-token run)`` as for torch. Batch 1 only (llama-cpp-python's
  high-level API decodes one sequence). Skipped, with the reason, when ``llama_cpp`` is missing
  or the export fails.

Every case is timed in turns (round-robin, ``--repeats`` rounds, median), with the same
``torch.set_num_threads`` (and llama.cpp ``n_threads``), so load from other processes on a shared
machine hits all alike; ratios are to fp32 of the same model and batch, measured in the same run:
``vs_fp32`` of the medians, ``vs_fp32_paired`` the median over rounds of each round's ratio.

Results: bench/results/llm_decode.json (``--quick``: 8 new tokens, one round, one layer for the
1B config, batch 1; a smoke run).
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

import harness
import slimtorch as st
from slimtorch.api import set_architecture
from slimtorch.artifact.kernels import use_kernels
from slimtorch.core.info import update_info
from slimtorch.eval.decode import NEW_TOKENS, PROMPT_TOKENS, decode_tokens_per_s, random_prompt
from slimtorch.models.registry import load_model

RESULTS = harness.result_path("llm_decode.json")
BATCHES = (1, 8)
SMOLLM2 = "builtin:smollm2-135m"


# ---------------------------------------------------------------- models


def smollm2() -> nn.Module:
    loaded = load_model(SMOLLM2)
    set_architecture(loaded.model, loaded.architecture)
    update_info(loaded.model, tokenizer=SMOLLM2)
    return loaded.model.eval()


def llama_1b(layers: int) -> nn.Module:
    """Random-init Llama-3.2-1B shapes, ``layers`` layers, SmolLM2's vocabulary."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=layers,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=49152,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).eval()
    update_info(model, tokenizer=SMOLLM2)
    return model


def tied(model: nn.Module) -> bool:
    """Whether the LM head is the token embedding."""
    head: Any = model.get_output_embeddings()  # type: ignore[operator]
    embed: Any = model.get_input_embeddings()  # type: ignore[operator]
    return head is not None and head.weight is embed.weight


def head4_recipe() -> dict[str, Any]:
    """``w4a16-rtn`` with the (untied) LM head in its 4-bit stage too: the head then runs on
    the int4 kernel (the embedding stays 8-bit per row)."""
    from slimtorch.recipe.recipe import load_recipe

    recipe = load_recipe("w4a16-rtn").to_dict()
    first = recipe["stages"][0]
    first["ignore"] = [t for t in first.get("ignore", []) if t != "lm_head"]
    recipe["stages"][1]["targets"] = ["Embedding"]
    recipe.pop("description", None)
    return recipe


# ---------------------------------------------------------------- llama.cpp


def llama_cpp_missing() -> str | None:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return "llama_cpp not installed (pip install llama-cpp-python==0.3.36; make install)"
    return None


def export_gguf(model: nn.Module, path: Path, requantize: str | None) -> str | None:
    """Write ``model`` as GGUF to ``path``; the reason when it cannot."""
    from slimtorch.export import export

    try:
        export(model, to="gguf", out=path, requantize=requantize)
    except Exception as exc:  # the exporter is young: record why and skip the row
        return f"{type(exc).__name__}: {str(exc)[:300]}"
    return None


def llama_cpp_decoder(path: Path, threads: int, prompt: Sequence[int]) -> Callable[[int], float]:
    """A function timing llama.cpp's greedy decoding of ``n`` tokens after ``prompt`` (seconds,
    prefill included) on the GGUF file at ``path``."""
    from llama_cpp import Llama

    llm = Llama(
        model_path=str(path), n_threads=threads, n_threads_batch=threads, n_ctx=256,
        verbose=False, seed=0,
    )  # fmt: skip

    def seconds(n: int) -> float:
        start = time.perf_counter()
        tokens = llm.generate(list(prompt), top_k=1, top_p=1.0, temp=0.0, reset=True)
        for made, _ in enumerate(tokens, start=1):
            if made >= n:
                break
        return time.perf_counter() - start

    return seconds


def llama_cpp_rate(seconds: Callable[[int], float], new_tokens: int) -> float:
    """Tokens per second as :func:`decode_tokens_per_s` counts them (prefill left out)."""
    first, full = seconds(1), seconds(new_tokens)
    return (new_tokens - 1) / max(full - first, 1e-9)


# ---------------------------------------------------------------- measurement


def measure(
    name: str, fp32: nn.Module, args: argparse.Namespace, tmp: Path
) -> list[dict[str, Any]]:
    """Every case of one model, timed in turns."""
    new_tokens = args.new_tokens
    batches = (1,) if args.quick else BATCHES
    assert batches[0] == 1
    vocab = int(fp32.config.vocab_size)  # type: ignore[union-attr]
    prompt = random_prompt(vocab, PROMPT_TOKENS)
    prompts = {b: prompt.expand(b, -1).contiguous() for b in batches}
    missing = llama_cpp_missing()
    models: dict[str, nn.Module] = {"fp32": fp32}
    notes: dict[str, str] = {}
    files: dict[str, Path] = {}
    with harness.stopwatch() as sw:
        models["bf16"] = copy.deepcopy(fp32).to(torch.bfloat16)
    print(f"{name}: built bf16 in {sw.seconds:.1f} s", flush=True)
    cases: list[tuple[str, Any, str | None, str | None]] = [
        ("int8 (kernels)", "int8", "llama.cpp Q8_0", None),
        ("int4 (kernels)", "w4a16-rtn", "llama.cpp Q4_0", "Q4_0"),
    ]
    if not tied(fp32):
        cases.append(("int4, 4-bit head (kernels)", head4_recipe(), None, None))
    for case, preset, gguf_case, requant in cases:
        with harness.stopwatch() as sw:
            model = st.compress(fp32, preset).model.eval()
        print(f"{name}: {case} compressed in {sw.seconds:.1f} s", flush=True)
        given = args.gguf.get(f"{name}:{gguf_case.split()[-1]}") if gguf_case else None
        if gguf_case is None:
            pass
        elif missing:
            notes[gguf_case] = missing
        elif given is not None:
            files[gguf_case] = Path(given)
        else:  # before use_kernels: the exporter reads the Linears' quantization states
            path = tmp / f"{name}-{gguf_case.split()[-1]}.gguf"
            with harness.stopwatch() as sw:
                why = export_gguf(model, path, requant)
            if why:
                notes[gguf_case] = f"export failed: {why}"
                print(f"{name}: {gguf_case} skipped: {notes[gguf_case]}", flush=True)
            else:
                files[gguf_case] = path
                print(f"{name}: wrote {path.name} in {sw.seconds:.1f} s", flush=True)
        use_kernels(model)
        models[case] = model
        gc.collect()
    # (case, batch) -> a function measuring tokens per second once
    rates: dict[tuple[str, int], Callable[[], float]] = {}
    for case, model in models.items():
        decode_tokens_per_s(model, prompts[1], min(new_tokens, 8), warmup=1, repeats=1)
        for b in batches:
            rates[(case, b)] = lambda m=model, ids=prompts[b]: decode_tokens_per_s(
                m, ids, new_tokens, warmup=0, repeats=1
            )
    for case, path in files.items():
        decoder = llama_cpp_decoder(path, args.threads, prompt[0].tolist())
        decoder(min(new_tokens, 8))  # warm-up
        rates[(case, 1)] = lambda d=decoder: llama_cpp_rate(d, new_tokens)
    samples: dict[tuple[str, int], list[float]] = {k: [] for k in rates}
    for r in range(args.repeats):
        for key, fn in rates.items():
            samples[key].append(fn())
            print(f"{name} round {r + 1}: {key[0]} batch {key[1]}: {samples[key][-1]:.2f} tok/s",
                  flush=True)  # fmt: skip
    rows = []
    for (case, b), values in samples.items():
        med = statistics.median(values)
        base = statistics.median(samples[("fp32", b)])
        # the ratio within each round (same load), then the median over rounds
        paired = [v / f for v, f in zip(values, samples[("fp32", b)], strict=True)]
        rows.append({
            "model": name, "case": case, "batch": b, "tokens_per_s": round(med, 2),
            "runs": [round(v, 2) for v in values], "vs_fp32": round(med / base, 2),
            "vs_fp32_paired": round(statistics.median(paired), 2),
            "file_bytes": files[case].stat().st_size if case in files else None,
        })  # fmt: skip
    for case, why in notes.items():
        rows.append({"model": name, "case": case, "batch": 1, "skipped": why})
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    body = []
    for r in rows:
        if "skipped" in r:
            body.append(
                [r["model"], r["case"], str(r["batch"]), "skipped", "", "", r["skipped"][:80]]
            )
        else:
            body.append([r["model"], r["case"], str(r["batch"]), f"{r['tokens_per_s']:.2f}",
                         f"{r['vs_fp32']:.2f}x", f"{r['vs_fp32_paired']:.2f}x", ""])  # fmt: skip
    header = ["model", "case", "batch", "tokens/s", "vs fp32", "vs fp32 (per round)", "note"]
    return harness.markdown_table(header, body, "lllrrrl")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=1, help="torch and llama.cpp threads")
    p.add_argument("--repeats", type=int, default=3, help="rounds of the round-robin")
    p.add_argument("--new-tokens", type=int, default=NEW_TOKENS)
    p.add_argument("--layers", type=int, default=4, help="layers of the 1B-shaped config")
    p.add_argument("--only", choices=("smollm2", "llama-1b"), action="append")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny settings")
    p.add_argument(
        "--gguf",
        action="append",
        default=[],
        metavar="MODEL:TYPE=PATH",
        help="a GGUF file to time instead of exporting one, e.g. smollm2-135m:Q4_0=q4.gguf"
        " (MODEL: smollm2-135m or llama-1b-4l; TYPE: Q8_0 or Q4_0)",
    )
    args = p.parse_args()
    args.gguf = dict(item.split("=", 1) for item in args.gguf)
    if args.quick:
        args.new_tokens, args.repeats, args.layers = 8, 1, 1
    torch.set_num_threads(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    which = args.only or ["smollm2", "llama-1b"]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="slimtorch-bench-decode-") as tmp:
        for name in which:
            fp32 = smollm2() if name == "smollm2" else llama_1b(args.layers)
            label = "smollm2-135m" if name == "smollm2" else f"llama-1b-{args.layers}l"
            rows += measure(label, fp32, args, Path(tmp))
            del fp32
            gc.collect()
    record = {
        "rows": rows,
        "threads": args.threads,
        "prompt_tokens": PROMPT_TOKENS,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "quick": args.quick,
    }
    harness.save_result(RESULTS, record, packages=("llama-cpp-python", "gguf"))
    print(table(rows))
    print(f"threads {args.threads}; wrote {RESULTS}")


if __name__ == "__main__":
    main()
