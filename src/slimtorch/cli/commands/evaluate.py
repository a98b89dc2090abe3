"""``slimtorch eval DIR``: measure an artifact (size, latency, quality) against the original."""

from __future__ import annotations

import argparse
from typing import Any

from slimtorch.cli.options import add_common, add_trust, context
from slimtorch.cli.render import before_after


def add_parser(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "eval", help="measure an artifact: size, latency, quality, against the original"
    )
    p.add_argument("dir")
    p.add_argument("--data", help="evaluation data (default: what the artifact records)")
    p.add_argument("--latency-batch", type=int, default=1)
    p.add_argument("--no-baseline", action="store_true", help="skip measuring the original model")
    p.add_argument(
        "--width",
        type=float,
        help="serve a prune.reorder-ed artifact on this fraction of its channels, e.g. 0.5",
    )
    p.add_argument(
        "--tokenizer",
        help="a causal LM's tokenizer: tokenizer.json (or a directory holding it) or"
        " builtin:NAME; default: the one the artifact records",
    )
    p.add_argument(
        "--llm-windows",
        type=int,
        default=8,
        help="LLM quality suite (perplexity, KL divergence from the original): held-out windows"
        " per text (builtin:wikipedia, builtin:austen); 0 skips it",
    )
    p.add_argument("--llm-window-tokens", type=int, default=512, help="tokens per LLM suite window")
    p.add_argument(
        "--no-decode",
        action="store_true",
        help="skip a causal LM's decoding speed (tokens_per_s: greedy, batch 1, 128 new tokens"
        " after a 64-token prompt, KV cache)",
    )
    p.add_argument(
        "--no-kernels",
        action="store_true",
        help="time decoding on the dequantized float model, not on torch's int4/int8 kernels",
    )
    p.add_argument(
        "--kv-bits",
        type=int,
        help="also score a causal LM with the quantized KV cache (8, 4 or 2 bits, KIVI-style)"
        " against its float cache on the LLM suite's windows (a quarter prefilled, then 32"
        " tokens at a time through the cache), with the bytes per token it holds",
    )
    p.add_argument("--kv-group", type=int, help="with --kv-bits: group size (default 32)")
    p.add_argument(
        "--kv-window", type=int, help="with --kv-bits: exact recent tokens (default 128)"
    )
    add_trust(p)
    add_common(p)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from slimtorch.workflows.evaluate import evaluate_dir

    return evaluate_dir(
        args.dir,
        args.data,
        context(args),
        args.latency_batch,
        baseline=not args.no_baseline,
        width=args.width,
        model=args.model,
        trust_factory=args.trust_factory,
        tokenizer=args.tokenizer,
        llm_suite=(args.llm_windows, args.llm_window_tokens),
        decode=not args.no_decode,
        kernels=not args.no_kernels,
        kv=(args.kv_bits, args.kv_group, args.kv_window),
    )


def render(r: dict[str, Any]) -> str:
    return f"artifact (source {r.get('source')})\n" + before_after(r)
