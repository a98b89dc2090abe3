"""eval.accuracy: top-1 percent of any classifier, with an optional input transform."""

import pytest
import torch
from torch import nn

from slimtorch.core.errors import UserInputError
from slimtorch.eval.accuracy import accuracy, model_device


class SignOfFirst(nn.Module):
    """Predicts class 1 when the first feature is positive, else class 0."""

    def __init__(self) -> None:
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.dtype == torch.float32 and not self.training
        return torch.stack([-x[:, 0], x[:, 0]], dim=1) + self.dummy


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    inputs = torch.tensor([[1.0], [2.0], [-1.0], [-2.0], [3.0]])
    labels = torch.tensor([1, 0, 0, 0, 1])  # right on 1, 3, 4, 5 -> 80%
    return inputs, labels


@pytest.mark.parametrize("batch_size", [1, 2, 1000])
def test_accuracy_exact_batch_independent_and_restores_mode(batch_size: int) -> None:
    model = SignOfFirst().train()
    assert accuracy(model, *_data(), batch_size=batch_size) == pytest.approx(80.0)
    assert model.training


def test_prepare_maps_each_batch() -> None:
    inputs, labels = _data()
    seen = []

    def negate(x: torch.Tensor) -> torch.Tensor:
        seen.append(len(x))
        return -x.float()

    assert accuracy(SignOfFirst(), inputs.int(), labels, 2, prepare=negate) == pytest.approx(20.0)
    assert seen == [2, 2, 1]


def test_bad_inputs() -> None:
    inputs, labels = _data()
    with pytest.raises(UserInputError, match="one label per input"):
        accuracy(SignOfFirst(), inputs, labels[:3])
    with pytest.raises(UserInputError, match="empty"):
        accuracy(SignOfFirst(), inputs[:0], labels[:0])
    with pytest.raises(UserInputError, match="batch_size"):
        accuracy(SignOfFirst(), inputs, labels, batch_size=0)


def test_model_device() -> None:
    assert model_device(SignOfFirst()) == torch.device("cpu")
    assert model_device(nn.ReLU()) == torch.device("cpu")
