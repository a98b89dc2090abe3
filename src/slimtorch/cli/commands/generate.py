"""``slimtorch generate DIR --prompt TEXT``: greedy continuation and tokens per second."""

from __future__ import annotations

import argparse
from typing import Any

from slimtorch.cli.options import add_common, add_trust, context
from slimtorch.cli.render import fmt


def add_parser(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "generate", help="greedy text from a saved causal LM, and its tokens per second"
    )
    p.add_argument("dir")
    p.add_argument("--prompt", required=True, help="the text to continue")
    p.add_argument(
        "--max-new-tokens", type=int, default=64, help="at most this many new tokens (default 64)"
    )
    p.add_argument(
        "--tokenizer",
        help="the model's tokenizer: tokenizer.json (or a directory holding it) or builtin:NAME;"
        " default: the one the artifact records",
    )
    p.add_argument(
        "--kernels",
        action="store_true",
        help="run weight-only quantized layers on torch's int4 / int8 kernels (int4 also on CUDA)",
    )
    p.add_argument(
        "--kv-bits",
        type=int,
        help="decode with the quantized KV cache: keys per channel, values per token at 8, 4"
        " or 2 bits (KIVI-style); default: the float cache",
    )
    p.add_argument(
        "--kv-group",
        type=int,
        help="with --kv-bits: tokens per key scale and channels per value scale (a power of two"
        " dividing the head dimension; default 32)",
    )
    p.add_argument(
        "--kv-window",
        type=int,
        help="with --kv-bits: the most recent tokens kept in full precision (default 128)",
    )
    add_trust(p)
    add_common(p)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from slimtorch.workflows.generate import generate_dir

    return generate_dir(
        args.dir,
        args.prompt,
        args.max_new_tokens,
        tokenizer=args.tokenizer,
        model=args.model,
        trust_factory=args.trust_factory,
        kernels=args.kernels,
        kv=(args.kv_bits, args.kv_group, args.kv_window),
        ctx=context(args),
    )


def render(r: dict[str, Any]) -> str:
    text = (
        f"{r['prompt']}{r['text']}\n\n"
        f"{r['new_tokens']} new tokens in {fmt(r['seconds'])} s: "
        f"{fmt(r['tokens_per_s'])} tokens/s (greedy, batch 1, KV cache)"
    )
    kv = r.get("kv_cache")
    if kv:
        text += (
            f"\nKV cache {kv['bits']}-bit (group {kv['group']}, window {kv['window']}):"
            f" {fmt(kv['bytes_per_token'])} bytes/token held over {kv['tokens']} tokens,"
            f" float cache {fmt(kv['fp_bytes_per_token'])} ({fmt(kv['ratio'])}x)"
        )
    return text
