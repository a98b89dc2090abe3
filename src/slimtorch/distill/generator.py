"""The generator of data-free distillation: latent noise -> an input of the model's shape.

* images ``[C, H, W]`` with ``H`` and ``W`` divisible by 4: DCGAN-like (Linear to a
  ``width x H/4 x W/4`` map, two nearest upsamplings, 3x3 convolutions with BatchNorm and
  LeakyReLU);
* any other float input ``[...]``: a two-layer MLP reshaped to the input's shape.

Both end in a BatchNorm without scale or shift over the output channels (as DFAD's generator):
the generated inputs have the mean 0 / variance 1 of a normalised dataset, and the adversary
cannot win by inflating them.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from slimtorch.core.errors import ConfigError


class ImageGenerator(nn.Module):
    """``z [B, latent] -> [B, C, H, W]`` with two 2x upsamplings from ``H/4 x W/4``."""

    def __init__(self, shape: tuple[int, int, int], latent: int, width: int) -> None:
        super().__init__()
        c, h, w = shape
        self.base = (width, h // 4, w // 4)
        self.project = nn.Sequential(
            nn.Linear(latent, width * (h // 4) * (w // 4)),
            nn.BatchNorm1d(width * (h // 4) * (w // 4)),
        )
        half = max(width // 2, 1)
        self.body = nn.Sequential(
            nn.Upsample(scale_factor=2),
            nn.Conv2d(width, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.LeakyReLU(0.2),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(width, half, 3, padding=1, bias=False),
            nn.BatchNorm2d(half),
            nn.LeakyReLU(0.2),
            nn.Conv2d(half, c, 3, padding=1),
            nn.BatchNorm2d(c, affine=False),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.project(z).view(z.shape[0], *self.base)
        return self.body(x)  # type: ignore[no-any-return]


class VectorGenerator(nn.Module):
    """``z [B, latent] -> [B, *shape]`` through an MLP."""

    def __init__(self, shape: tuple[int, ...], latent: int, width: int) -> None:
        super().__init__()
        self.shape = shape
        size = math.prod(shape)
        self.net = nn.Sequential(
            nn.Linear(latent, width * 4),
            nn.BatchNorm1d(width * 4),
            nn.LeakyReLU(0.2),
            nn.Linear(width * 4, size),
            nn.BatchNorm1d(size, affine=False),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z).view(z.shape[0], *self.shape)  # type: ignore[no-any-return]


def make_generator(shape: tuple[int, ...], latent: int, width: int) -> nn.Module:
    """The generator for one input of ``shape`` (without the batch dim)."""
    if not shape or any(d < 1 for d in shape):
        raise ConfigError(f"cannot generate inputs of shape {list(shape)}: every dim must be >= 1")
    if len(shape) == 3 and shape[1] % 4 == 0 and shape[2] % 4 == 0:
        return ImageGenerator((shape[0], shape[1], shape[2]), latent, width)
    return VectorGenerator(shape, latent, width)
