"""calibrate.lm: random token windows of a stream, next-token cross-entropy."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from slimtorch.calibrate import lm
from slimtorch.core.context import Context
from slimtorch.core.errors import UnsupportedModelError, UserInputError
from slimtorch.zoo.austen_lm import from_config, llama_config

VOCAB = 64


def tiny_llama() -> nn.Module:
    torch.manual_seed(0)
    cfg = llama_config(
        VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return from_config(cfg)


def test_batches_shapes_seeded_and_loss_near_uniform() -> None:
    ids = torch.arange(1000, dtype=torch.int64) % VOCAB
    task = lm.CausalLMTask(ids, window=16)
    batches = list(task.train_batches(Context(seed=3), steps=2, batch_size=5))
    again = list(task.train_batches(Context(seed=3), steps=2, batch_size=5))
    assert len(batches) == 2 and batches[0][0].shape == (5, 16)
    assert batches[0][0].dtype == torch.int64
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again))
    # windows are contiguous slices of the stream
    row = batches[0][0][0]
    assert bool(((row[1:] - row[:-1]) % VOCAB == 1).all())
    model = tiny_llama()
    logits = task.forward(model, batches[0])
    assert logits.shape == (5, 16, VOCAB)
    loss = task.loss(model, batches[0])
    assert float(loss.detach()) == pytest.approx(math.log(VOCAB), rel=0.03)
    loss.backward()  # differentiable


def test_training_on_the_task_lowers_the_loss() -> None:
    ids = torch.arange(2000, dtype=torch.int64) * 5 % VOCAB
    task = lm.CausalLMTask(ids, window=16)
    model = tiny_llama().train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for batch in task.train_batches(Context(), steps=30, batch_size=8):
        loss = task.loss(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.3 * losses[0]


def test_next_token_loss_perfect_and_shape_errors() -> None:
    ids = torch.tensor([[1, 2, 3]])
    logits = torch.full((1, 3, 4), -1e4)
    logits[0, 0, 2] = logits[0, 1, 3] = 0.0
    assert float(lm.next_token_loss(logits, ids)) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(UnsupportedModelError, match="logits"):
        lm.next_token_loss(torch.zeros(1, 4), ids)


def test_calibration_windows_seeded() -> None:
    ids = torch.arange(500, dtype=torch.int64)
    task = lm.CausalLMTask(ids, window=32)
    a = task.calibration_windows(4, 20, seed=1)
    assert a.shape == (4, 20) and torch.equal(a, task.calibration_windows(4, 20, seed=1))
    assert not torch.equal(a, task.calibration_windows(4, 20, seed=2))
    assert bool((a[:, 1:] - a[:, :-1] == 1).all())
    assert task.calibration_windows(2).shape == (2, 32)


def test_bad_inputs() -> None:
    with pytest.raises(UserInputError, match="fewer than one window"):
        lm.CausalLMTask(torch.arange(10), window=16)
    with pytest.raises(UserInputError, match="1-D int64"):
        lm.CausalLMTask(torch.zeros(2, 40, dtype=torch.int64))
    with pytest.raises(UserInputError, match="length >= 2"):
        lm.CausalLMTask(torch.arange(100), window=16).calibration_windows(3, 1)
