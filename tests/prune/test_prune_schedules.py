"""Cubic schedule values and GradualPruning inside slimtorch's trainer and a hand-written loop."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from slimtorch.calibrate.train import KeepMasks, TrainOptions, train
from slimtorch.core.context import Context
from slimtorch.core.errors import ConfigError
from slimtorch.formats.state import get_state
from slimtorch.prune.masking import reapply_masks
from slimtorch.prune.schedules import CubicSchedule, GradualPruning, cubic_sparsity
from slimtorch.testing.tasks import TensorTask, tensor_task


def _regression_task(d_in: int = 8, d_out: int = 2) -> TensorTask:
    """Random inputs, targets from a fixed random linear teacher; MSE loss."""
    teacher = torch.randn(d_in, d_out, generator=torch.Generator().manual_seed(123))
    x = torch.randn(2048, d_in, generator=torch.Generator().manual_seed(1))
    return tensor_task(x, x @ teacher, loss="mse", name="tiny-regression")


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 2)
    )


def _formula(t: float, si: float, sf: float, t0: int, dt: int, n: int) -> float:
    return sf + (si - sf) * (1 - (t - t0) / (n * dt)) ** 3


def test_cubic_values_at_start_middle_end() -> None:
    si, sf, t0, dt, n = 0.1, 0.9, 20, 5, 8
    assert cubic_sparsity(t0, si, sf, t0, dt, n) == pytest.approx(si)
    mid = t0 + n * dt // 2
    assert cubic_sparsity(mid, si, sf, t0, dt, n) == pytest.approx(_formula(mid, si, sf, t0, dt, n))
    assert cubic_sparsity(mid, si, sf, t0, dt, n) == pytest.approx(0.9 - 0.8 / 8)
    assert cubic_sparsity(t0 + n * dt, si, sf, t0, dt, n) == pytest.approx(sf)
    assert cubic_sparsity(0, si, sf, t0, dt, n) == si
    assert cubic_sparsity(10_000, si, sf, t0, dt, n) == sf
    for t in range(t0, t0 + n * dt + 1):
        assert cubic_sparsity(t, si, sf, t0, dt, n) == pytest.approx(_formula(t, si, sf, t0, dt, n))
    vals = [cubic_sparsity(t, si, sf, t0, dt, n) for t in range(0, 100)]
    assert vals == sorted(vals)


def test_pruning_steps() -> None:
    s = CubicSchedule(0.0, 0.5, start_step=3, frequency=4, n=3)
    assert s.end_step == 15
    assert [t for t in range(30) if s.is_pruning_step(t)] == [3, 7, 11, 15]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"initial": 0.5, "final": 0.2},
        {"initial": 0.0, "final": 1.0},
        {"initial": 0.0, "final": 0.5, "frequency": 0},
        {"initial": 0.0, "final": 0.5, "n": 0},
    ],
)
def test_bad_schedule(kwargs: dict[str, float]) -> None:
    with pytest.raises(ConfigError, match="gradual pruning needs"):
        CubicSchedule(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_gradual_pruning_in_trainer(scope: str) -> None:
    model = _mlp()
    sched = CubicSchedule(0.0, 0.75, start_step=5, frequency=5, n=6)
    pruner = GradualPruning(sched, targets=["Linear"], scope=scope)  # type: ignore[arg-type]
    losses = train(
        model,
        _regression_task(),
        Context(progress=False),
        TrainOptions(steps=60, lr=1e-2, batch_size=32),
        callbacks=[pruner],
    )
    assert len(losses) == 60 and all(torch.isfinite(torch.tensor(losses)))
    assert [h[0] for h in pruner.history] == [5, 10, 15, 20, 25, 30, 35]
    for step, target, achieved in pruner.history:
        assert target == pytest.approx(sched.sparsity_at(step))
        assert achieved == pytest.approx(target, abs=0.01)
    total = pruned = 0
    for layer in (model[0], model[2], model[4]):
        mask = get_state(layer, "weight").mask
        assert (layer.weight[~mask] == 0).all()  # exactly zero after 25 more training steps
        if scope == "layer":
            assert int((~mask).sum()) == round(0.75 * mask.numel())
        total += mask.numel()
        pruned += int((~mask).sum())
    if scope == "global":
        assert pruned == round(0.75 * total)
    else:
        assert pruned / total == pytest.approx(0.75, abs=1e-2)
    assert losses[-1] < losses[0]


def test_gradual_pruning_in_a_hand_written_loop() -> None:
    model = _mlp()
    pruner = GradualPruning(
        CubicSchedule(0.2, 0.6, start_step=0, frequency=3, n=4), targets=["Linear"]
    )
    keep = KeepMasks()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    task = _regression_task()
    for step, batch in enumerate(task.train_batches(Context(), 20, 16)):
        opt.zero_grad()
        task.loss(model, batch).backward()
        keep.on_after_backward(model, step)
        opt.step()
        pruner.on_step_end(model, step)
        assert reapply_masks(model) == 3  # step 0 already prunes to 0.2
    assert pruner.history[0][1] == pytest.approx(0.2)
    assert pruner.history[-1][1:] == (pytest.approx(0.6), pytest.approx(0.6, abs=0.01))
    for layer in (model[0], model[2], model[4]):
        mask = get_state(layer, "weight").mask
        assert (layer.weight[~mask] == 0).all()


def test_gradual_scope_validated() -> None:
    with pytest.raises(ConfigError, match="scope"):
        GradualPruning(CubicSchedule(0.0, 0.5), scope="model")  # type: ignore[arg-type]
