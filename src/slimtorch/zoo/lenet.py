"""LeNet-300-100 and LeNet-5 (Caffe layout, as in Deep Compression), trained on Fashion-MNIST.

Inputs are ``float [B, 1, 28, 28]`` made by :func:`slimtorch.zoo.data_images.to_model_input`.
The committed weights in ``zoo/weights/`` come from ``python -m slimtorch.zoo.train_lenet``.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from slimtorch.core.errors import ArtifactError
from slimtorch.models.registry import MODELS, BuiltinModel

WEIGHTS_DIR = Path(__file__).parent / "weights"


class LeNet300(nn.Module):
    """784-300-100-10 fully connected network with ReLU (266,610 parameters)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.fc1 = nn.Linear(784, 300)
        self.fc2 = nn.Linear(300, 100)
        self.fc3 = nn.Linear(100, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)  # type: ignore[no-any-return]


class LeNet5(nn.Module):
    """Caffe LeNet-5: conv 20@5x5, pool, conv 50@5x5, pool, fc 800->500, fc 500->10 (431,080)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 20, 5)
        self.conv2 = nn.Conv2d(20, 50, 5)
        self.fc1 = nn.Linear(800, 500)
        self.fc2 = nn.Linear(500, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        return self.fc2(x)  # type: ignore[no-any-return]


ARCHITECTURES: dict[str, type[nn.Module]] = {"lenet300": LeNet300, "lenet5": LeNet5}


def weights_path(name: str) -> Path:
    """The committed weights of builtin ``name`` (e.g. ``lenet5-fashion``)."""
    return WEIGHTS_DIR / f"{name}.safetensors"


def _builder(arch: str, name: str, summary: str) -> BuiltinModel:
    cls = ARCHITECTURES[arch]

    def build(pretrained: bool) -> nn.Module:
        model = cls()
        if pretrained:
            path = weights_path(name)
            if not path.is_file():
                raise ArtifactError(
                    f"weights of builtin:{name} missing at {path}; reinstall slimtorch or run"
                    f" `python -m slimtorch.zoo.train_lenet --model {arch} --out {path}`"
                )
            model.load_state_dict(load_file(str(path)))
        return model.eval()

    return BuiltinModel(
        name=name,
        summary=summary,
        build=build,
        evaluator="accuracy",
        data="builtin:fashion-mnist",
        example_inputs=lambda b: (torch.randn(b, 1, 28, 28),),
        task="classification",
    )


MODELS.add(
    "lenet300-fashion",
    _builder("lenet300", "lenet300-fashion", "LeNet-300-100 MLP on Fashion-MNIST, 267k params"),
)
MODELS.add(
    "lenet5-fashion",
    _builder(
        "lenet5", "lenet5-fashion", "LeNet-5 CNN (Caffe layout) on Fashion-MNIST, 431k params"
    ),
)
