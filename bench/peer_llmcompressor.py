"""llm-compressor's side of bench/bench_llm_peers.py: ``oneshot`` with ``GPTQModifier``,
``SparseGPTModifier`` or ``WandaPruningModifier`` on the builtin model, calibrated on the shared
rows through a ``DataLoader`` (no dataset download, no shuffling). Runs in the peers'
virtualenv (llmcompressor 0.14 installed with --no-deps next to our torch).

    /tmp/peers-venv/bin/python bench/peer_llmcompressor.py sparsegpt-50 --calib F

Settings: targets Linear, ignore ``re:.*lm_head``; pipeline "sequential" (decoder layer by decoder
layer, each fed by the already compressed layers, as ours). GPTQ: int, asymmetric, strategy
group, group_size 128, actorder "static" (llm-compressor's name for act_order with groups fixed
up front = our static_groups), block_size 128, dampening_frac 0.01. SparseGPT: sparsity 0.5,
mask_structure "0:0" or "2:4", block_size 128, dampening_frac 0.01. Wanda: sparsity 0.5,
mask_structure "0:0" or "2:4". The timed call is ``oneshot``; the model it returns is scored.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).parent))
from peer_common import BLOCK, DAMP, GROUP, Method, run_one

# "lm_head" alone does not match in the pruning modifiers (they see the name "lm_head."; their
# own warning asks for a regex), so the head would be pruned - and with it the tied embedding
IGNORE = ["re:.*lm_head"]


def modifier(method: Method) -> Any:
    structure = f"{method.n}:{method.m}" if method.n else "0:0"
    if method.kind == "gptq":
        from llmcompressor.modifiers.gptq import GPTQModifier  # type: ignore[import-not-found]

        weights = {"num_bits": method.bits, "type": "int", "symmetric": False,
                   "strategy": "group", "group_size": GROUP}  # fmt: skip
        return GPTQModifier(
            config_groups={"group_0": {"targets": ["Linear"], "weights": weights}},
            ignore=IGNORE,
            actorder="static",
            block_size=BLOCK,
            dampening_frac=DAMP,
        )
    if method.kind == "sparsegpt":
        from llmcompressor.modifiers.pruning import SparseGPTModifier

        return SparseGPTModifier(
            sparsity=method.sparsity, mask_structure=structure, targets=["Linear"],
            ignore=IGNORE, block_size=BLOCK, dampening_frac=DAMP,
        )  # fmt: skip
    from llmcompressor.modifiers.pruning import WandaPruningModifier

    return WandaPruningModifier(
        sparsity=method.sparsity, mask_structure=structure, targets=["Linear"],
        ignore=IGNORE,
    )  # fmt: skip


def compress(
    model: nn.Module, calib: torch.Tensor, method: Method, args: argparse.Namespace
) -> nn.Module:
    from llmcompressor import oneshot  # type: ignore[import-not-found]

    rows = [{"input_ids": r, "attention_mask": torch.ones_like(r)} for r in calib]
    loader = DataLoader(rows, batch_size=args.batch_size, shuffle=False)  # type: ignore[arg-type]
    out = oneshot(model=model, dataset=loader, recipe=[modifier(method)], pipeline="sequential")
    return out if isinstance(out, nn.Module) else model


if __name__ == "__main__":
    run_one("llm-compressor 0.14", __doc__.split("\n")[0], compress)
