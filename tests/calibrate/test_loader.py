"""A torch DataLoader (plus a loss function) as the Task that stages calibrate and train on."""

from __future__ import annotations

from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import slimtorch as st
from slimtorch.calibrate.loader import LoaderTask, as_task, to_device
from slimtorch.core.context import Context
from slimtorch.core.errors import ConfigError
from slimtorch.testing.models import example_input, tiny_cnn, tiny_lstm

GPTQ = {
    "stages": [
        {
            "method": "quantize.gptq",
            "bits": 4,
            "group_size": 16,
            "calibration": {"samples": 16, "batch_size": 8},
        }
    ]
}
FINETUNE = {"stages": [{"method": "train.finetune", "train": {"steps": 40, "lr": 0.01}}]}


def _tokens() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, 32, (16, 10), generator=gen), torch.randint(0, 32, (16,), generator=gen)


class _HandWritten:
    """The reference: the Task a user had to write before, over the same two batches of 8.
    (Kept hand-written on purpose: it is what the adapter must match.)"""

    name = "hand-written"

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def train_batches(self, ctx: Context, steps: int, batch_size: int) -> Iterator[Any]:
        for i in range(steps):
            yield self.x[i * 8 : (i + 1) * 8], self.y[i * 8 : (i + 1) * 8]

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        return F.cross_entropy(model(batch[0]), batch[1])

    def forward(self, model: nn.Module, batch: Any) -> Any:
        return model(batch[0])


def _assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_gptq_on_a_loader_equals_gptq_on_the_hand_written_task() -> None:
    x, y = _tokens()
    model = tiny_lstm()
    want = st.compress(model, GPTQ, data=_HandWritten(x, y)).model
    labelled = DataLoader(TensorDataset(x, y), batch_size=8)  # no loss_fn: calibration only
    _assert_same_weights(st.compress(model, GPTQ, data=labelled).model, want)
    bare = DataLoader(x, batch_size=8)  # batches of inputs only
    _assert_same_weights(st.compress(model, GPTQ, data=bare).model, want)
    _assert_same_weights(st.compress(model, GPTQ, data=st.data(labelled)).model, want)
    assert any(not torch.equal(a, b) for a, b in zip(want.parameters(), model.parameters()))


def _images() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 1, 8, 8, generator=gen)
    return x, (x.mean((1, 2, 3)) > 0).long() + 2 * (x[:, 0, 0, 0] > 0).long()


def test_finetune_on_a_loader_and_loss_fn_lowers_the_loss() -> None:
    x, y = _images()
    loader = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True)
    model = tiny_cnn()
    with torch.no_grad():
        before = float(F.cross_entropy(model(x), y))
    tuned = st.compress(model, FINETUNE, data=loader, loss_fn=F.cross_entropy).model
    with torch.no_grad():
        assert float(F.cross_entropy(tuned(x), y)) < 0.7 * before
    again = st.compress(model, FINETUNE, data=st.data(loader, F.cross_entropy)).model
    _assert_same_weights(again, tuned)  # the shuffle is seeded by the run: reproducible


def test_a_training_stage_without_loss_fn_names_it() -> None:
    x, y = _images()
    loader = DataLoader(TensorDataset(x, y), batch_size=32)
    with pytest.raises(ConfigError, match="loss_fn"):
        st.compress(tiny_cnn(), FINETUNE, data=loader)
    with pytest.raises(ConfigError, match="targets"):
        st.compress(tiny_cnn(), FINETUNE, data=DataLoader(x, batch_size=8), loss_fn=F.mse_loss)


def test_data_errors_name_the_fix() -> None:
    x, y = _images()
    with pytest.raises(ConfigError, match="TensorDataset"):
        st.compress(tiny_cnn(), FINETUNE, data=x)
    with pytest.raises(ConfigError, match="DataLoader"):
        st.compress(tiny_cnn(), FINETUNE, data=42)
    with pytest.raises(ConfigError, match="drop loss_fn"):
        as_task(_HandWritten(x, y), F.cross_entropy)
    with pytest.raises(ConfigError, match="without data"):
        st.compress(tiny_cnn(), FINETUNE, loss_fn=F.cross_entropy)
    with pytest.raises(ConfigError, match="no batches"):
        st.compress(tiny_cnn(), FINETUNE, data=[], loss_fn=F.cross_entropy)
    one_pass = iter([(x[:8], y[:8])] * 3)
    with pytest.raises(ConfigError, match="iterated again"):
        st.compress(tiny_cnn(), FINETUNE, data=one_pass, loss_fn=F.cross_entropy)


def test_train_batches_cycle_the_loader_at_its_own_batch_size() -> None:
    batches = [torch.full((2, 3), float(i)) for i in range(3)]
    task = LoaderTask(batches)
    got = list(task.train_batches(Context(), 7, batch_size=64))
    assert [int(b[0, 0]) for b in got] == [0, 1, 2, 0, 1, 2, 0]
    assert all(b.shape == (2, 3) for b in got)
    assert list(task.train_batches(Context(), 0, 8)) == []


class _KwargsModel(nn.Module):
    """Takes keyword inputs like a Hugging Face model and computes its own loss from labels."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(16, 4)
        self.head = nn.Linear(4, 16)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> Any:
        logits = self.head(self.emb(input_ids))
        loss = None if labels is None else F.cross_entropy(logits.flatten(0, 1), labels.flatten())
        return SimpleNamespace(logits=logits, loss=loss)


def test_dict_batches_use_the_models_own_loss_or_loss_fn() -> None:
    torch.manual_seed(0)
    model = _KwargsModel()
    ids = torch.randint(0, 16, (4, 5))
    batch = {"input_ids": ids, "labels": ids}
    want = F.cross_entropy(model(ids).logits.flatten(0, 1), ids.flatten())
    own = LoaderTask([batch])
    assert own.has_labels
    assert torch.equal(own.loss(model, batch), want)

    def loss_fn(output: Any, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(output.logits.flatten(0, 1), labels.flatten())

    given = LoaderTask([batch], loss_fn)
    assert torch.equal(given.loss(model, batch), want)
    assert given.forward(model, batch).loss is None  # labels went to loss_fn, not the model
    unlabelled = LoaderTask([{"input_ids": ids}])
    assert not unlabelled.has_labels
    assert torch.equal(unlabelled.forward(model, {"input_ids": ids}).logits, model(ids).logits)
    with pytest.raises(ConfigError, match="loss_fn"):
        unlabelled.loss(model, {"input_ids": ids})
    with pytest.raises(ConfigError, match="'labels'"):
        LoaderTask([], loss_fn).loss(model, {"input_ids": ids})


def test_tuple_batches_and_labels() -> None:
    model = tiny_cnn()
    x = example_input(model)
    y = torch.tensor([0, 1, 2, 3])
    task = LoaderTask([(x, y)], F.cross_entropy)
    assert task.has_labels and not LoaderTask([(x, y)]).has_labels
    assert torch.equal(task.forward(model, (x, y)), model(x))
    assert torch.equal(task.forward(model, [x]), model(x))
    assert torch.equal(task.loss(model, (x, y)), F.cross_entropy(model(x), y))
    assert torch.equal(task.loss_from_output(model(x), [x, y]), F.cross_entropy(model(x), y))


def test_to_device_moves_nested_tensors() -> None:
    x = torch.zeros(2)
    moved = to_device({"a": (x, [x]), "b": 3}, "meta")
    assert moved["a"][0].device.type == "meta" and moved["a"][1][0].device.type == "meta"
    assert moved["b"] == 3 and isinstance(moved["a"], tuple) and isinstance(moved["a"][1], list)
