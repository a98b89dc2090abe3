"""``slimtorch moe CONFIG.yaml --out DIR``: a Mixtral mixture-of-experts model from dense models.

The YAML is mergekit-moe's (base_model, experts with source_model and positive/negative prompts,
gate_mode hidden | hidden_avg | cheap_embed | random | uniform_random, experts_per_token, dtype);
the routers, expert tensors and config equal mergekit-moe's (tests/merge/test_merge_mergekit_peer.py).
"""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Add the ``moe`` subcommand to the ``sub`` subparsers of the main parser."""
    p: argparse.ArgumentParser = sub.add_parser(
        "moe", help="build a mixture-of-experts model from dense models (mergekit-moe YAML)"
    )
    p.add_argument("config", help="mergekit-moe YAML: base_model, experts, gate_mode, ...")
    p.add_argument("--out", required=True, help="output directory (Hugging Face Mixtral)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.add_argument("--seed", type=int, default=0, help="seed of random routers and noise")
    p.add_argument(
        "--i-understand-this-is-not-useful-without-training",
        dest="allow_all_same",
        action="store_true",
        help="allow experts that are all the same model (only useful to train afterwards)",
    )
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    return p


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run ``slimtorch moe``; returns JSON-able facts about the model built."""
    from slimtorch.workflows.moe import build_moe

    return build_moe(args.config, args.out, args.force, args.seed, args.allow_all_same)


def render(result: dict[str, Any]) -> str:
    """Plain-text summary of :func:`run`'s result."""
    lines = [
        f"built a {len(result['experts'])}-expert MoE (top {result['experts_per_token']}) over"
        f" {result['base_model']}, routers by {result['gate_mode']}",
        f"wrote {result['out']} ({result['bytes_on_disk']:,} bytes) in {result['seconds']} s",
    ]
    if result["degenerate_layers"]:
        lines.append(
            f"warning: layers {result['degenerate_layers']} have nearly dependent router rows"
            " (prompts too alike): some experts will hardly be chosen"
        )
    return "\n".join(lines)
