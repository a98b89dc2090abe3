import numpy as np
import pytest
import torch
from torch import nn

from slimtorch.core.context import Context
from slimtorch.core.errors import UserInputError
from slimtorch.eval.accuracy import accuracy, evaluate_accuracy
from slimtorch.eval.quality import EVALUATORS
from slimtorch.zoo.data_images import to_model_input


class MeanThreshold(nn.Module):
    """Predicts class 1 when the mean normalised pixel is above 0, else class 0."""

    def __init__(self) -> None:
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.shape[1:] == (1, 28, 28) and x.dtype == torch.float32
        assert not self.training
        m = x.mean(dim=(1, 2, 3))
        return torch.stack([-m, m], dim=1) + self.dummy


def _data():
    images = torch.zeros(10, 28, 28, dtype=torch.uint8)
    images[:4] = 255  # bright -> predicted 1
    labels = torch.tensor([1, 1, 1, 0, 0, 0, 0, 0, 1, 1])
    return images, labels  # correct: 3 bright labelled 1 + 4 dark labelled 0 -> 7 of 10


@pytest.mark.parametrize("batch_size", [1, 3, 1000])
def test_accuracy_exact_and_batch_independent(batch_size):
    model = MeanThreshold().train()
    assert accuracy(model, *_data(), batch_size=batch_size) == pytest.approx(70.0)
    assert model.training  # mode restored


def test_accuracy_bad_inputs():
    images, labels = _data()
    with pytest.raises(UserInputError, match="one per image"):
        accuracy(MeanThreshold(), images, labels[:5])
    with pytest.raises(UserInputError, match="empty"):
        accuracy(MeanThreshold(), images[:0], labels[:0])
    with pytest.raises(UserInputError, match="batch_size"):
        accuracy(MeanThreshold(), images, labels, batch_size=0)


def test_evaluator_registered_and_reads_npz(tmp_path):
    images, labels = _data()
    path = tmp_path / "d.npz"
    np.savez(path, images=images.numpy(), labels=labels.numpy())
    evaluator = EVALUATORS.get("accuracy")
    assert evaluator is evaluate_accuracy
    q = evaluator(MeanThreshold(), Context(progress=False), str(path))
    assert (q.metric, q.higher_is_better) == ("accuracy", True)
    assert q.value == pytest.approx(70.0) and q.extra["images"] == 10.0


def test_evaluator_default_is_fashion_test_split():
    class Constant(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.one_hot(torch.full((len(x),), 3), 10).float()

    q = evaluate_accuracy(Constant(), Context(progress=False), None)
    # Fashion-MNIST is balanced: a constant guess is right on one image in ten
    assert q.value == pytest.approx(10.0, abs=1.0)
    assert q.extra["images"] in (2000.0, 10000.0)


def test_to_model_input_used_for_evaluation():
    images, _ = _data()
    x = to_model_input(images)
    assert float(x[0].mean()) > 0 > float(x[-1].mean())
