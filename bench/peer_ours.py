"""slimtorch's side of bench/bench_llm_peers.py: one recipe stage through ``slimtorch.compress``
on the shared calibration tensor (no random draw: :class:`FixedTask` yields its rows in order).

    .venv/bin/python bench/peer_ours.py gptq-w4 --calib /tmp/calib.safetensors
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from peer_common import BLOCK, DAMP, GROUP, Method, run_one


@dataclass
class FixedTask:
    """A calibration Task over fixed ids ``[n, L]``: batches are consecutive rows."""

    ids: torch.Tensor
    name: str = "causal-lm-fixed"

    def train_batches(self, ctx: Any, steps: int, batch_size: int) -> Iterator[tuple[torch.Tensor]]:
        for step in range(steps):
            chunk = self.ids[step * batch_size : (step + 1) * batch_size]
            if chunk.numel():
                yield (chunk,)

    def forward(self, model: nn.Module, batch: tuple[torch.Tensor]) -> Any:
        return model(batch[0]).logits

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError("calibration only")


def recipe(method: Method, samples: int, batch_size: int) -> dict[str, Any]:
    """The bench_llm.py stage for ``method`` (same options), calibrated on ``samples`` rows."""
    cal = {"samples": samples, "batch_size": batch_size}
    if method.kind == "gptq":
        stage: dict[str, Any] = {
            "method": "quantize.gptq",
            "bits": method.bits,
            "symmetric": False,
            "granularity": "per_group",
            "group_size": GROUP,
            "act_order": True,
            "static_groups": True,
            "damp": DAMP,
            "block_size": BLOCK,
        }
    elif method.kind == "sparsegpt":
        stage = {"method": "prune.sparsegpt", "damp": DAMP, "block_size": BLOCK}
    else:
        stage = {"method": "prune.wanda"}
    if method.kind != "gptq":
        stage.update({"n": method.n, "m": method.m} if method.n else {"sparsity": method.sparsity})
    return {"stages": [{**stage, "calibration": cal}]}


def compress(
    model: nn.Module, calib: torch.Tensor, method: Method, args: argparse.Namespace
) -> nn.Module:
    import slimtorch as st
    from slimtorch.core.context import Context

    rec = recipe(method, int(calib.shape[0]), args.batch_size)
    return st.compress(model, rec, data=FixedTask(calib), ctx=Context(progress=False)).model


if __name__ == "__main__":
    run_one("slimtorch", __doc__.split("\n")[0], compress)
