"""The shared training loop: seeded by the run, and the caller's global RNG left as it was."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from slimtorch.calibrate.train import TrainOptions, seeded_rng, train
from slimtorch.core.context import Context
from slimtorch.testing.tasks import TensorTask, tensor_task

OPTIONS = TrainOptions(steps=20, lr=1e-2, batch_size=16)


def _dropout_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 2))


def _task() -> TensorTask:
    x = torch.randn(128, 8, generator=torch.Generator().manual_seed(1))
    return tensor_task(x, (x[:, 0] > 0).long())


def _train(seed: int, global_seed: int) -> tuple[list[float], torch.Tensor]:
    model = _dropout_mlp()
    torch.manual_seed(global_seed)
    losses = train(model, _task(), Context(seed=seed, progress=False), OPTIONS)
    return losses, model[0].weight.detach().clone()


def test_train_leaves_the_global_rng_state_unchanged() -> None:
    model, task = _dropout_mlp(), _task()
    torch.manual_seed(123)
    before = torch.get_rng_state()
    train(model, task, Context(seed=7, progress=False), OPTIONS)
    assert torch.equal(torch.get_rng_state(), before)


def test_results_follow_ctx_seed_not_the_callers_rng() -> None:
    losses, weight = _train(seed=7, global_seed=1)
    again, weight_again = _train(seed=7, global_seed=999)
    assert losses == again and torch.equal(weight, weight_again)
    other, _ = _train(seed=8, global_seed=1)
    assert other != losses  # dropout draws from the run's own seeded stream


def test_seeded_rng_is_the_stream_of_manual_seed_and_restores_on_error() -> None:
    torch.manual_seed(5)
    want = torch.rand(4)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    with pytest.raises(RuntimeError, match="stop"), seeded_rng(Context(seed=5)):
        assert torch.equal(torch.rand(4), want)
        raise RuntimeError("stop")
    assert torch.equal(torch.get_rng_state(), before)
