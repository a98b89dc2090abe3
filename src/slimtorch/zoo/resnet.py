"""ResNet-18 for 28x28 grey-scale images (``builtin:resnet18-fashion``), trained on Fashion-MNIST.

The torchvision ResNet-18 layout (BasicBlock x [2, 2, 2, 2], stage widths w, 2w, 4w, 8w,
stride-2 downsampling with a 1x1 conv + BatchNorm shortcut), adapted to small images as for
CIFAR: a 3x3 stride-1 stem with BatchNorm + ReLU and no max-pool, global average pooling, one
Linear classifier. Module names follow torchvision (``conv1``, ``bn1``, ``layer1.0.conv1``,
``layer2.0.downsample.0``, ``fc``), so recipes written for torchvision ResNets target it as is.

Inputs are ``float [B, 1, 28, 28]`` made by :func:`slimtorch.zoo.data_images.to_model_input`.
The committed weights come from ``python -m slimtorch.zoo.train_resnet``.
"""

from __future__ import annotations

import torch
from safetensors.torch import load_file
from torch import nn

from slimtorch.core.errors import ArtifactError
from slimtorch.models.registry import MODELS, BuiltinModel
from slimtorch.zoo.lenet import weights_path

NAME = "resnet18-fashion"
# 24, not 8: at base width 8 (5-64 channels) a batch-32 forward pass on CPU is per-layer overhead
# and memory traffic, and removing half the FLOPs bought 1.0-1.4x (BENCHMARKS.md, structured
# pruning); the width-8 weights are in git history (commit 085a5c3).
BASE_WIDTH = 24
BLOCKS = (2, 2, 2, 2)


class BasicBlock(nn.Module):
    """Two 3x3 conv + BN, ReLU between and after the residual sum (torchvision's BasicBlock)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), nn.BatchNorm2d(out_ch)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)  # type: ignore[no-any-return]


def _stage(in_ch: int, out_ch: int, blocks: int, stride: int) -> nn.Sequential:
    layers = [BasicBlock(in_ch, out_ch, stride)]
    layers += [BasicBlock(out_ch, out_ch) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


class ResNet18Small(nn.Module):
    """ResNet-18 for ``in_channels`` x 28 x 28 images; ``width`` is the first stage's channels."""

    def __init__(
        self, width: int = BASE_WIDTH, num_classes: int = 10, in_channels: int = 1
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = _stage(width, width, BLOCKS[0], stride=1)
        self.layer2 = _stage(width, 2 * width, BLOCKS[1], stride=2)
        self.layer3 = _stage(2 * width, 4 * width, BLOCKS[2], stride=2)
        self.layer4 = _stage(4 * width, 8 * width, BLOCKS[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8 * width, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        for m in self.modules():  # zero-init the last BN of each block (Goyal et al. 2017)
            if isinstance(m, BasicBlock):
                nn.init.zeros_(m.bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))  # type: ignore[no-any-return]


def build(pretrained: bool) -> nn.Module:
    """The builtin's architecture; with ``pretrained`` its committed Fashion-MNIST weights."""
    model = ResNet18Small()
    if pretrained:
        path = weights_path(NAME)
        if not path.is_file():
            raise ArtifactError(
                f"weights of builtin:{NAME} missing at {path}; reinstall slimtorch or run"
                f" `python -m slimtorch.zoo.train_resnet --out {path}`"
            )
        model.load_state_dict(load_file(str(path)))
    return model.eval()


MODELS.add(
    NAME,
    BuiltinModel(
        name=NAME,
        summary="ResNet-18 (widths 24-192, no max-pool) on Fashion-MNIST, 1.57M params",
        build=build,
        evaluator="accuracy",
        data="builtin:fashion-mnist",
        example_inputs=lambda b: (torch.randn(b, 1, 28, 28),),
        task="classification",
    ),
)
