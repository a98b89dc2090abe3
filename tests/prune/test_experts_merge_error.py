"""Merging does something sensible: on a tiny MoE whose experts come in similar pairs (each odd
expert a perturbed copy of the even one before it, router rows alike), the MoE layers' outputs
on held-out tokens after ``mode: merge`` are closer to the unpruned layers' than after
``mode: drop``, at 25% and 50% of the experts removed."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")

import slimtorch as st
from slimtorch.testing.models import tiny_moe
from slimtorch.testing.tasks import tensor_task

EXPERTS = 8


def paired_moe(seed: int, top_k: int, spread: float = 0.3) -> nn.Module:
    """A tiny Mixtral whose expert ``2j + 1`` is expert ``2j`` plus noise of ``spread`` times
    its weights' scale (output cosine ~0.87), its router row ``2j``'s plus a little noise."""
    model = tiny_moe("mixtral", layers=2, experts=EXPERTS, top_k=top_k, seed=seed)
    gen = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for layer in model.model.layers:
            ex, gate = layer.mlp.experts, layer.mlp.gate
            for j in range(0, EXPERTS, 2):
                for p in (ex.gate_up_proj, ex.down_proj):
                    p[j + 1] = p[j] + spread * 0.1 * torch.randn(p[j].shape, generator=gen)
                gate.weight[j + 1] = gate.weight[j] + 0.02 * torch.randn(
                    gate.weight[j].shape, generator=gen
                )
    return model


def _mlp_inputs(model: nn.Module, ids: torch.Tensor) -> list[torch.Tensor]:
    """Each layer's MoE block input on ``ids`` (the unpruned model's)."""
    found: list[torch.Tensor] = []
    handles = [
        layer.mlp.register_forward_pre_hook(lambda _m, args: found.append(args[0].detach()))
        for layer in model.model.layers
    ]
    with torch.no_grad():
        model(ids)
    for h in handles:
        h.remove()
    return found


def _out(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    y = mlp(x)
    return y[0] if isinstance(y, tuple) else y


def layer_errors(dense: nn.Module, pruned: nn.Module, ids: torch.Tensor) -> list[float]:
    """Per layer: ``||y_pruned - y_dense||^2 / ||y_dense||^2`` of the MoE block's output, both
    fed the unpruned model's inputs to that block."""
    errors = []
    with torch.no_grad():
        for i, x in enumerate(_mlp_inputs(dense, ids)):
            ref = _out(dense.model.layers[i].mlp, x)
            got = _out(pruned.model.layers[i].mlp, x)
            errors.append(float(((got - ref) ** 2).sum() / (ref**2).sum()))
    return errors


def compare(seed: int, fraction: float, top_k: int) -> dict[str, float]:
    """Both layers' relative errors summed, for each mode, on one paired model."""
    model = paired_moe(seed, top_k)
    gen = torch.Generator().manual_seed(seed)
    calib = torch.randint(0, 128, (8, 32), generator=gen)
    held_out = torch.randint(0, 128, (8, 32), generator=gen)
    task: Any = tensor_task(calib, loss="next_token")
    out = {}
    for mode in ("drop", "merge"):
        stage = {"method": "prune.experts", "mode": mode, "fraction": fraction,
                 "calibration": {"samples": 8, "batch_size": 4}}  # fmt: skip
        pruned = st.compress(model, {"stages": [stage]}, data=task).model
        out[mode] = sum(layer_errors(model, pruned, held_out))
    return out


SEEDS = range(6)


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("fraction", [0.25, 0.5])
def test_merge_beats_drop_on_paired_experts(fraction: float, top_k: int) -> None:
    """Default options. Over six seeded models the total error of merge is below drop's.
    Per model it is not always (when both experts of a pair are among the least salient they
    are merged into unrelated experts): the measured table is in the H3 report."""
    runs = [compare(seed, fraction, top_k) for seed in SEEDS]
    drop, merge = sum(r["drop"] for r in runs), sum(r["merge"] for r in runs)
    assert 0 < merge < drop, runs
    assert sum(r["merge"] < r["drop"] for r in runs) >= len(runs) // 2, runs
