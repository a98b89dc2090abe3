"""testing.tensor_task: a Task from tensors, at the batch size each stage asks for."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from slimtorch.core.context import Context
from slimtorch.core.errors import ConfigError
from slimtorch.testing.tasks import logits_of, tensor_task


def test_batches_cover_every_example_once_per_epoch_reshuffled_by_the_seed() -> None:
    x = torch.arange(10).float().unsqueeze(1)
    task = tensor_task(x, torch.arange(10))
    batches = list(task.train_batches(Context(seed=3), 6, 4))
    assert [len(b[0]) for b in batches] == [4, 4, 2, 4, 4, 2]  # a batch never spans two epochs
    for xb, yb in batches:
        assert torch.equal(xb.squeeze(1).long(), yb)  # targets stay with their inputs
    first = torch.cat([b[1] for b in batches[:3]])
    second = torch.cat([b[1] for b in batches[3:]])
    assert sorted(first.tolist()) == sorted(second.tolist()) == list(range(10))
    assert not torch.equal(first, second)
    again = list(task.train_batches(Context(seed=3), 6, 4))
    assert all(torch.equal(a[1], b[1]) for a, b in zip(again, batches, strict=True))
    other = next(iter(task.train_batches(Context(seed=4), 1, 10)))[1]
    assert not torch.equal(other, first)
    assert [len(b[0]) for b in task.train_batches(Context(), 2, 64)] == [10, 10]


def test_losses() -> None:
    torch.manual_seed(0)
    model = nn.Linear(3, 5)
    x, y = torch.randn(6, 3), torch.randint(0, 5, (6,))
    assert torch.equal(tensor_task(x, y).loss(model, (x, y)), F.cross_entropy(model(x), y))
    t = torch.randn(6, 5)
    assert torch.equal(tensor_task(x, t, "mse").loss(model, (x, t)), F.mse_loss(model(x), t))
    doubled = tensor_task(x, t, lambda out, tgt: 2 * F.mse_loss(out, tgt))
    assert torch.equal(doubled.loss(model, (x, t)), 2 * F.mse_loss(model(x), t))


def test_next_token_on_a_hugging_face_style_output() -> None:
    torch.manual_seed(0)
    emb = nn.Embedding(7, 7)

    def lm(ids: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(logits=emb(ids))

    ids = torch.randint(0, 7, (3, 6))
    task = tensor_task(ids, loss="next_token")
    batch = next(iter(task.train_batches(Context(), 1, 3)))
    assert torch.equal(batch[0], batch[1])  # the targets are the tokens themselves
    logits = emb(batch[0])
    want = F.cross_entropy(logits[:, :-1].reshape(-1, 7), batch[0][:, 1:].reshape(-1))
    assert torch.equal(task.loss(lm, batch), want)  # type: ignore[arg-type]


def test_inputs_only_calibrate_and_a_training_loss_explains() -> None:
    model = nn.Linear(3, 2)
    x = torch.randn(8, 3)
    task = tensor_task(x)
    batch = next(iter(task.train_batches(Context(), 1, 4)))
    assert isinstance(batch, torch.Tensor) and batch.shape == (4, 3)
    assert torch.equal(task.forward(model, batch), model(batch))
    assert not task.has_labels and tensor_task(x, torch.zeros(8)).has_labels
    with pytest.raises(ConfigError, match="give targets"):
        task.loss(model, batch)


def test_bad_arguments() -> None:
    with pytest.raises(ConfigError, match="8 inputs but 3 targets"):
        tensor_task(torch.zeros(8, 2), torch.zeros(3))
    with pytest.raises(ConfigError, match="no inputs"):
        tensor_task(torch.zeros(0, 2))
    with pytest.raises(ConfigError, match="unknown loss 'l1'"):
        tensor_task(torch.zeros(8, 2), torch.zeros(8), "l1")  # type: ignore[arg-type]


def test_logits_of() -> None:
    t = torch.zeros(2)
    assert (
        logits_of(t) is t and logits_of((t, 1)) is t and logits_of(SimpleNamespace(logits=t)) is t
    )
    with pytest.raises(TypeError, match="dict"):
        logits_of({"x": t})
