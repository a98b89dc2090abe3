"""Task charlm: random 40-char windows and their next character, cross-entropy loss."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from slimtorch.calibrate import charlm
from slimtorch.calibrate.tasks import TASKS
from slimtorch.calibrate.train import TrainOptions, train
from slimtorch.core.context import Context
from slimtorch.core.errors import UserInputError
from slimtorch.zoo import char_lstm


def _text_task(tmp_path: Path, text: str) -> charlm.CharLMTask:
    path = tmp_path / "t.txt"
    path.write_text(text, encoding="utf-8")
    return TASKS.get("charlm")(str(path))


def test_batches_are_windows_and_next_chars(tmp_path: Path) -> None:
    task = _text_task(tmp_path, "abcdefghij" * 20)
    batches = list(task.train_batches(Context(seed=3), steps=2, batch_size=16))
    assert len(batches) == 2
    x, y = batches[0]
    assert x.shape == (16, 40) and y.shape == (16,) and x.dtype == y.dtype == torch.int64
    inv = {v: k for k, v in char_lstm.vocab().items()}
    for row, target in zip(x.tolist(), y.tolist()):
        prev = inv[row[-1]]
        assert inv[target] == "abcdefghij"[("abcdefghij".index(prev) + 1) % 10]
    again = next(task.train_batches(Context(seed=3), steps=1, batch_size=16))
    other = next(task.train_batches(Context(seed=4), steps=1, batch_size=16))
    assert torch.equal(again[0], x) and not torch.equal(other[0], x)


def test_loss_is_cross_entropy(tmp_path: Path) -> None:
    task = _text_task(tmp_path, "hello world. " * 30)
    model = char_lstm.build(False)
    batch = next(task.train_batches(Context(), 1, 8))
    assert torch.allclose(task.loss(model, batch), F.cross_entropy(model(batch[0]), batch[1]))
    assert task.forward(model, batch).shape == (8, 465)


def test_training_lowers_loss(tmp_path: Path) -> None:
    task = _text_task(tmp_path, "the cat sat on the mat. " * 40)
    torch.manual_seed(0)
    model = char_lstm.build(False)
    opts = TrainOptions(steps=40, lr=1e-2, batch_size=32)
    losses = train(model, task, Context(progress=False), opts)
    assert losses[0] == pytest.approx(math.log(465), abs=0.5)  # untrained: near uniform
    assert sum(losses[-5:]) / 5 < 3.0


def test_default_data_is_austen_train_split() -> None:
    task = charlm.make_charlm(None)
    assert task.name == "charlm"
    from slimtorch.zoo.data_text import austen_split

    assert task.ids.numel() == len(austen_split("train"))
    assert int(task.positions.numel()) > 3_500_000


def test_text_without_vocabulary_characters(tmp_path: Path) -> None:
    with pytest.raises(UserInputError, match="vocabulary"):
        _text_task(tmp_path, "\x01\x02\x03")
