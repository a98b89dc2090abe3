"""KV-cache quantization on a real LLM: bytes per token and quality at 8, 4 and 2 bits.

    .venv/bin/python bench/bench_kv_cache.py [--windows 2] [--artifact DIR] [--markdown F]

Model: builtin:smollm2-135m (30 layers, 3 KV heads of 64 channels, float32 on CPU), and a
w4a16-gptq artifact of it (``--artifact DIR``; without it one is made here: w4a16-gptq on
bench_llm_real.py's calibration windows) to show the cache combines with a weight scheme.

Protocol (:mod:`slimtorch.eval.kv_quality`): ``--windows`` windows per text of ``--length``
(2048) tokens from evenly spaced places of the held-out split of builtin:wikipedia and
builtin:austen under the model's tokenizer. Each window is fed as decoding would: a prefill of
``--prefill`` (512) tokens in one pass, then ``--chunk`` (32) tokens at a time through the cache
(each chunk reads the past from the cache: quantized beyond the exact window). Positions after
the prefill are scored (1,535 a window): perplexity and KL divergence of the next-token
distribution from the reference run, the same feed through transformers' float
``DynamicCache``. For the artifact, KLD is given against the float model with the float cache
(``kld_mean``: weights and cache together) and against the artifact with the float cache
(``cache_kld_mean``: the cache alone).

Bytes per token: what each cache holds at the end of a window (codes, float16 scales and
minimums, and the exact window), counted from its tensors and divided by its tokens (2048), and
the asymptotic bytes per token of the quantized part (formula: window excluded). Results:
bench/results/kv_cache.json, rewritten after every window.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import harness

RESULTS = harness.result_path("kv_cache.json")
MODEL = "builtin:smollm2-135m"
TEXTS = ("builtin:wikipedia", "builtin:austen")
# key -> (bits, group, window); None: the float cache
CONFIGS: dict[str, tuple[int, int, int] | None] = {
    "fp": None,
    "kv8": (8, 32, 128),
    "kv4": (4, 32, 128),
    "kv2": (2, 32, 128),
}
ARTIFACT_CONFIGS = ("fp", "kv8", "kv4")


def windows(length: int, n: int) -> list[tuple[str, Any]]:
    """``(text, ids [1, length])`` windows, interleaved across the texts."""
    from slimtorch.calibrate.text import TOKEN_WINDOWS, tokenizer_file

    tok = tokenizer_file(MODEL)
    per_text = {t: TOKEN_WINDOWS.get("heldout")(t, tok, n, length) for t in TEXTS}
    return [(t, per_text[t][i : i + 1]) for i in range(n) for t in TEXTS if i < len(per_text[t])]


def make_artifact(work: Path) -> Path:
    """A w4a16-gptq artifact of the model (bench_llm_real.py's 64 calibration windows)."""
    import bench_llm_real as real
    import slimtorch as st
    from slimtorch.core.context import Context
    from slimtorch.core.info import update_info

    out = work / "w4a16-gptq"
    if (out / "manifest.json").is_file():
        return out
    loaded = real.load_base()
    update_info(loaded.model, architecture=loaded.architecture, source=MODEL, tokenizer=MODEL)
    task = real.fixed_task(real.make_calibration(64))
    result = st.compress(loaded.model, "w4a16-gptq", data=task, ctx=Context(progress=False))
    st.save(result.model, out)
    return out


def kv_config(key: str) -> Any:
    from slimtorch.runtime.kv_cache import KVQuantConfig

    spec = CONFIGS[key]
    return None if spec is None else KVQuantConfig(*spec)


def formula(key: str, layers: int, kv_heads: int, head_dim: int) -> float | None:
    from slimtorch.runtime.kv_quant import bytes_per_token

    spec = CONFIGS[key]
    if spec is None:
        return None
    return layers * kv_heads * bytes_per_token(spec[0], spec[1], head_dim)


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    import slimtorch as st
    from slimtorch.eval.divergence import DivergenceStats
    from slimtorch.eval.kv_quality import score_pieces, scored_pieces
    from slimtorch.models.registry import load_model

    torch.set_num_threads(args.threads)
    feed = (args.prefill, args.chunk)
    base = load_model(MODEL).model.eval()
    artifact = None if args.no_artifact else args.artifact or make_artifact(args.work)
    w4 = None if artifact is None else st.load(artifact).eval()
    cfg: Any = base.config
    shape = (cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim)
    rows = [("base", k) for k in CONFIGS if k != "fp"]
    rows += [("w4", k) for k in ARTIFACT_CONFIGS if w4 is not None]
    stats = {r: DivergenceStats() for r in rows}
    cache_stats = {r: DivergenceStats() for r in rows if r[0] == "w4"}
    held: dict[tuple[str, str], list[float]] = {r: [] for r in [("base", "fp"), *rows]}
    seconds: dict[tuple[str, str], float] = {r: 0.0 for r in held}
    result: dict[str, Any] = {}
    for i, (text, ids) in enumerate(windows(args.length, args.windows)):
        start = time.perf_counter()
        reference, per_token = scored_pieces(base, ids, None, feed)
        seconds[("base", "fp")] += time.perf_counter() - start
        held[("base", "fp")].append(per_token)
        w4_fp: Any = None
        for who, key in rows:
            model = base if who == "base" or w4 is None else w4
            start = time.perf_counter()
            pieces, per_token = scored_pieces(model, ids, kv_config(key), feed)
            seconds[(who, key)] += time.perf_counter() - start
            held[(who, key)].append(per_token)
            score_pieces(stats[(who, key)], reference, pieces, ids)
            if who == "w4" and key == "fp":
                w4_fp = pieces
            elif who == "w4":
                score_pieces(cache_stats[(who, key)], w4_fp, pieces, ids)
            del pieces
        result = {
            "model": MODEL,
            "artifact": None if artifact is None else str(artifact),
            "layers_kv_heads_head_dim": list(shape),
            "protocol": {
                "length": args.length,
                "prefill": args.prefill,
                "chunk": args.chunk,
                "texts": list(TEXTS),
                "windows_done": i + 1,
                "threads": args.threads,
            },
            "rows": [row(r, stats, cache_stats, held, seconds, shape) for r in held],
        }
        result["rows"][0]["perplexity"] = result["rows"][1]["baseline_perplexity"]
        harness.save_result(args.out, result, indent=2)
        print(f"window {i + 1} ({text}) done", flush=True)
        if args.markdown is not None:
            args.markdown.write_text(table(result))
    return result


def row(
    r: tuple[str, str], stats: dict[Any, Any], cache_stats: dict[Any, Any],
    held: dict[Any, list[float]], seconds: dict[Any, float], shape: tuple[int, int, int],
) -> dict[str, Any]:  # fmt: skip
    who, key = r
    spec = CONFIGS[key]
    out: dict[str, Any] = {
        "model": "smollm2-135m" if who == "base" else "w4a16-gptq artifact",
        "cache": key,
        "bits_group_window": list(spec) if spec else None,
        "bytes_per_token": sum(held[r]) / len(held[r]),
        "bytes_per_token_asymptotic": formula(key, *shape),
        "seconds": round(seconds[r], 1),
    }
    if r in stats:
        out.update(stats[r].summary())
    if r in cache_stats and key != "fp":
        s = cache_stats[r].summary()
        out.update({"cache_kld_mean": s["kld_mean"], "cache_kld_p99": s["kld_p99"],
                    "cache_top1_agreement": s["top1_agreement"]})  # fmt: skip
    return out


def fmt(value: Any, spec: str) -> str:
    return "" if value is None else format(value, spec)


def table(result: dict[str, Any]) -> str:
    header = ["model", "cache", "bytes/token", "asymptotic", "perplexity", "KLD mean",
              "KLD p99", "top-1", "cache-only KLD", "s"]  # fmt: skip
    cells = []
    for r in result["rows"]:
        cells.append([r["model"], r["cache"], fmt(r["bytes_per_token"], ",.0f"),
                      fmt(r["bytes_per_token_asymptotic"], ",.0f"),
                      fmt(r.get("perplexity", r.get("baseline_perplexity")), ".3f"),
                      fmt(r.get("kld_mean"), ".5f"), fmt(r.get("kld_p99"), ".4f"),
                      fmt(r.get("top1_agreement"), ".4f"), fmt(r.get("cache_kld_mean"), ".5f"),
                      fmt(r["seconds"], ".0f")])  # fmt: skip
    return harness.markdown_table(header, cells, "llrrrrrrrr") + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--windows", type=int, default=2, help="windows per text")
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--prefill", type=int, default=512)
    parser.add_argument("--chunk", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--artifact", type=Path, default=None)
    parser.add_argument("--no-artifact", action="store_true", help="the float model's rows only")
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench-kv-cache"))
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--markdown", type=Path, default=None)
    args = parser.parse_args()
    result = run(args)
    print(json.dumps(result["rows"], indent=1))


if __name__ == "__main__":
    main()
