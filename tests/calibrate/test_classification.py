import numpy as np
import pytest
import torch

from slimtorch.calibrate.classification import ClassificationTask, epoch_batches
from slimtorch.calibrate.tasks import TASKS
from slimtorch.calibrate.train import TrainOptions, train
from slimtorch.core.context import Context
from slimtorch.core.errors import UserInputError
from slimtorch.zoo.data_images import load_fashion_mnist
from slimtorch.zoo.lenet import LeNet300

CTX = Context(seed=0, progress=False)


@pytest.fixture
def tiny_npz(tmp_path):
    images, labels = load_fashion_mnist("test")
    path = tmp_path / "tiny.npz"
    np.savez(path, images=images[:256].numpy(), labels=labels[:256].numpy())
    return str(path)


def test_epoch_batches_cover_every_item_once_per_epoch():
    inputs, labels = torch.arange(10).float(), torch.arange(10)
    gen = torch.Generator().manual_seed(0)
    batches = list(epoch_batches(inputs, labels, steps=8, batch_size=3, gen=gen))
    sizes = [len(y) for _, y in batches]
    assert sizes == [3, 3, 3, 1, 3, 3, 3, 1]
    first = torch.cat([y for _, y in batches[:4]])
    second = torch.cat([y for _, y in batches[4:]])
    assert sorted(first.tolist()) == list(range(10)) == sorted(second.tolist())
    assert not torch.equal(first, second)  # reshuffled
    assert all(torch.equal(x.long(), y) for x, y in batches)  # pairs stay together


def test_task_batches_shapes_and_seeding(tiny_npz):
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


def test_task_loss_and_forward(tiny_npz):
    task = ClassificationTask(tiny_npz)
    torch.manual_seed(0)
    model = LeNet300()
    batch = next(iter(task.train_batches(CTX, 1, 32)))
    assert task.forward(model, batch).shape == (32, 10)
    loss = task.loss(model, batch)
    assert loss.ndim == 0 and 1.5 < float(loss.detach()) < 3.5  # about ln(10) at init


def test_training_with_task_lowers_loss(tiny_npz):
    torch.manual_seed(0)
    model = LeNet300()
    losses = train(model, ClassificationTask(tiny_npz), CTX, TrainOptions(steps=25, batch_size=32))
    assert len(losses) == 25
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:3])


def test_task_bad_inputs(tmp_path, tiny_npz):
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
