"""A small DCGAN trained on Fashion-MNIST: the generator that bench/bench_data_free.py compresses.

    python -m slimtorch.zoo.train_dcgan --out /tmp/dcgan-fashion.safetensors [--steps 1200]

Seeded (model init, noise and data order), Adam (lr 2e-4, betas 0.5/0.999), batch 32, the
non-saturating GAN loss. The generator upsamples with nearest-neighbour upsampling + 3x3
convolutions (not transposed convolutions), so slimtorch's structured pruning can take its
channels: ``z [B, 32] -> Linear -> 32 x 7 x 7 -> up, conv 32 -> up, conv 16 -> conv 1, tanh``.
Its images are pixels in [-1, 1] (:func:`to_pixels` turns them into uint8 Fashion-MNIST images).
The weights are not shipped: the bench trains them (minutes on one CPU thread).
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from slimtorch.zoo.data_images import load_fashion_mnist

log = logging.getLogger(__name__)

LATENT = 32


class Generator(nn.Module):
    """``z [B, latent] -> images [B, 1, 28, 28]`` in [-1, 1] (69k parameters at width 32)."""

    def __init__(self, latent: int = LATENT, width: int = 32) -> None:
        super().__init__()
        self.width = width
        self.project = nn.Linear(latent, width * 7 * 7)
        self.bn0 = nn.BatchNorm1d(width * 7 * 7)
        self.up = nn.Upsample(scale_factor=2)
        self.conv1 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width // 2, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width // 2)
        self.conv3 = nn.Conv2d(width // 2, 1, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn0(self.project(z))).unflatten(1, (-1, 7, 7))
        x = F.relu(self.bn1(self.conv1(self.up(x))))
        x = F.relu(self.bn2(self.conv2(self.up(x))))
        return torch.tanh(self.conv3(x))


class Discriminator(nn.Module):
    """``images [B, 1, 28, 28] -> logit [B]``."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, width // 2, 4, 2, 1)
        self.conv2 = nn.Conv2d(width // 2, width, 4, 2, 1)
        self.bn2 = nn.BatchNorm2d(width)
        self.fc = nn.Linear(width * 7 * 7, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.leaky_relu(self.conv1(x), 0.2)
        x = F.leaky_relu(self.bn2(self.conv2(x)), 0.2)
        return self.fc(x.flatten(1)).squeeze(1)  # type: ignore[no-any-return]


def generator() -> nn.Module:
    """An untrained :class:`Generator` (a factory for ``slimtorch.load(path, model=...)``)."""
    return Generator().eval()


def to_pixels(images: torch.Tensor) -> torch.Tensor:
    """Generated ``[B, 1, 28, 28]`` in [-1, 1] -> uint8 ``[B, 28, 28]`` (0-255)."""
    return ((images.detach().float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)[:, 0]


def _from_pixels(images: torch.Tensor) -> torch.Tensor:
    return images.float().div(127.5).sub(1.0).unsqueeze(1)


@dataclass(frozen=True)
class GanSpec:
    steps: int = 1200
    batch_size: int = 32
    lr: float = 2e-4
    seed: int = 0


def train_dcgan(spec: GanSpec) -> tuple[nn.Module, list[float]]:
    """Train a generator (and its discriminator) on the Fashion-MNIST train split."""
    torch.manual_seed(spec.seed)
    gen, disc = Generator(), Discriminator()
    images, _ = load_fashion_mnist("train")
    g_opt = torch.optim.Adam(gen.parameters(), lr=spec.lr, betas=(0.5, 0.999))
    d_opt = torch.optim.Adam(disc.parameters(), lr=spec.lr, betas=(0.5, 0.999))
    order = torch.Generator().manual_seed(spec.seed)
    perm, pos, g_losses = torch.randperm(len(images), generator=order), 0, []
    for step in range(spec.steps):
        if pos + spec.batch_size > len(perm):
            perm, pos = torch.randperm(len(images), generator=order), 0
        real = _from_pixels(images[perm[pos : pos + spec.batch_size]])
        pos += spec.batch_size
        fake = gen(torch.randn(spec.batch_size, LATENT))
        ones, zeros = torch.ones(spec.batch_size), torch.zeros(spec.batch_size)
        d_loss = F.binary_cross_entropy_with_logits(
            disc(real), ones
        ) + F.binary_cross_entropy_with_logits(disc(fake.detach()), zeros)
        d_opt.zero_grad(set_to_none=True)
        d_loss.backward()
        d_opt.step()
        g_loss = F.binary_cross_entropy_with_logits(disc(fake), ones)
        g_opt.zero_grad(set_to_none=True)
        g_loss.backward()
        g_opt.step()
        g_losses.append(float(g_loss.detach()))
        if (step + 1) % 500 == 0:
            recent = g_losses[-500:]
            log.info(
                "step %d: G %.3f D %.3f",
                step + 1,
                sum(recent) / len(recent),
                float(d_loss.detach()),
            )
    if not all(math.isfinite(v) for v in g_losses):
        raise RuntimeError("GAN training diverged; try another --seed")
    return gen.eval(), g_losses


def train_and_save(spec: GanSpec, out: Path) -> dict[str, float]:
    """Train, then write the generator's weights (safetensors) to ``out``."""
    start = time.perf_counter()
    gen, losses = train_dcgan(spec)
    out.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous() for k, v in gen.state_dict().items()}
    save_file(tensors, str(out), metadata={"arch": "dcgan-generator", "steps": str(spec.steps)})
    return {"seconds": round(time.perf_counter() - start, 1), "final_g_loss": losses[-1]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="generator weights to write")
    parser.add_argument("--steps", type=int, default=GanSpec.steps)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    info = train_and_save(GanSpec(steps=args.steps, seed=args.seed), args.out)
    log.info("wrote %s (%s)", args.out, info)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
