"""``slimtorch extract-lora``: a fine-tuned model as its base plus a PEFT LoRA adapter.

    slimtorch extract-lora --model tuned/ --base-model base/ --out-path lora/ --max-rank 32

The flags are mergekit-extract-lora's; so are the maths (truncated SVD of each Linear's delta)
and the adapter's tensors (bit-identical, tests/merge/test_merge_mergekit_peer.py).
"""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Add the ``extract-lora`` subcommand to the ``sub`` subparsers of the main parser."""
    p: argparse.ArgumentParser = sub.add_parser(
        "extract-lora", help="extract a LoRA adapter from a fine-tune and its base model"
    )
    p.add_argument("--model", required=True, help="the fine-tuned model (HF directory)")
    p.add_argument("--base-model", required=True, help="the base it was fine-tuned from")
    p.add_argument("--out-path", required=True, help="output directory of the PEFT adapter")
    p.add_argument("--max-rank", type=int, default=128, help="largest LoRA rank (default 128)")
    p.add_argument(
        "--no-distribute-scale",
        dest="distribute_scale",
        action="store_false",
        help="put the singular values in lora_A only (default: sqrt in A and in B)",
    )
    p.add_argument("--sv-epsilon", type=float, default=0.0, help="drop singular values <= this")
    p.add_argument("--force", action="store_true", help="replace an adapter in --out-path")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    return p


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run ``slimtorch extract-lora``; returns facts about the adapter written."""
    from slimtorch.workflows.merge import extract_lora_to_dir

    return extract_lora_to_dir(
        args.base_model, args.model, args.out_path, args.max_rank, args.distribute_scale,
        args.sv_epsilon, args.force,
    )  # fmt: skip


def render(result: dict[str, Any]) -> str:
    """Plain-text summary of :func:`run`'s result."""
    size = f"{result['adapter_bytes']:,} bytes"
    if result.get("model_bytes"):
        size += f" ({result['adapter_bytes'] / result['model_bytes']:.1%} of the fine-tune)"
    return "\n".join([
        f"extracted rank {result['rank']} LoRA from {result['model']}"
        f" against {result['base_model']}",
        f"{result['lora_modules']} low-rank modules, {result['full_tensors']} saved whole",
        f"wrote {result['out']}: {size} in {result['seconds']} s",
    ])  # fmt: skip
