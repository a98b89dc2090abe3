"""Train the builtin ResNet-18 on Fashion-MNIST and write its committed weights and record.

    python -m slimtorch.zoo.train_resnet --out src/slimtorch/zoo/weights/resnet18-fashion.safetensors

Seeded (model init, data order and augmentation), SGD with Nesterov momentum, a linear warm-up
then cosine decay, weight decay, label smoothing, random 2-pixel shifts and horizontal flips;
fp32 weights. The record (``weights/training.json``) keeps the settings, time, test accuracy and
versions, as for the LeNets.
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from slimtorch.zoo.data_images import load_fashion_mnist, to_model_input
from slimtorch.zoo.resnet import BASE_WIDTH, NAME, ResNet18Small
from slimtorch.zoo.train_lenet import RECORD_FILE, save_classifier

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ResNetTrainSpec:
    """How the ResNet is trained."""

    epochs: int = 8
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_fraction: float = 0.1
    label_smoothing: float = 0.1
    batch_size: int = 128
    shift: int = 2
    flip: bool = True
    seed: int = 0
    width: int = BASE_WIDTH


def augment(images: torch.Tensor, shift: int, flip: bool, gen: torch.Generator) -> torch.Tensor:
    """Shift each uint8 ``[N, 28, 28]`` image by up to ``shift`` pixels (zero fill), maybe flip it."""
    n, h, w = images.shape
    out = images
    if shift > 0:
        padded = F.pad(images, (shift, shift, shift, shift))
        dy = torch.randint(0, 2 * shift + 1, (n,), generator=gen)
        dx = torch.randint(0, 2 * shift + 1, (n,), generator=gen)
        rows = (dy[:, None] + torch.arange(h))[:, :, None]
        cols = (dx[:, None] + torch.arange(w))[:, None, :]
        out = padded[torch.arange(n)[:, None, None], rows, cols]
    if flip:
        mask = torch.rand(n, generator=gen) < 0.5
        out = torch.where(mask[:, None, None], out.flip(-1), out)
    return out


def warmup_cosine(step: int, total: int, warmup: int) -> float:
    """Learning-rate factor: linear from ~0 to 1 over ``warmup`` steps, then cosine to 0."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def train_resnet(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, spec: ResNetTrainSpec
) -> list[float]:
    """Train ``model`` on uint8 ``images``; returns the mean training loss of each epoch."""
    steps_per_epoch = math.ceil(len(labels) / spec.batch_size)
    total = spec.epochs * steps_per_epoch
    warmup = max(1, int(spec.warmup_fraction * total))
    opt = torch.optim.SGD(
        model.parameters(),
        lr=spec.lr,
        momentum=spec.momentum,
        weight_decay=spec.weight_decay,
        nesterov=True,
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, total, warmup))
    gen = torch.Generator().manual_seed(spec.seed)
    model.train()
    losses = []
    for epoch in range(spec.epochs):
        order = torch.randperm(len(labels), generator=gen)
        running = 0.0
        for i in range(steps_per_epoch):
            idx = order[i * spec.batch_size : (i + 1) * spec.batch_size]
            x = to_model_input(augment(images[idx], spec.shift, spec.flip, gen))
            loss = F.cross_entropy(model(x), labels[idx], label_smoothing=spec.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            running += float(loss.detach()) * len(idx)
        losses.append(running / len(labels))
        log.info("epoch %d/%d: train loss %.4f", epoch + 1, spec.epochs, losses[-1])
    model.eval()
    return losses


def train_and_save(spec: ResNetTrainSpec, out: Path, record_path: Path | None) -> dict[str, Any]:
    """Train on the full train split, test on all 10,000 test images, write weights (and record)."""
    torch.manual_seed(spec.seed)
    model = ResNet18Small(spec.width)
    train_x, train_y = load_fashion_mnist("train")
    test_x, test_y = load_fashion_mnist("test")
    start = time.perf_counter()
    losses = train_resnet(model, train_x, train_y, spec)
    seconds = time.perf_counter() - start
    return save_classifier(
        model, out, "resnet18", asdict(spec), losses, seconds, (train_x, train_y),
        (test_x, test_y), record_path,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, help="weights file (default: the builtin's)")
    parser.add_argument("--epochs", type=int, default=ResNetTrainSpec.epochs)
    parser.add_argument("--lr", type=float, default=ResNetTrainSpec.lr)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--width", type=int, default=BASE_WIDTH, help="base width (the builtin is BASE_WIDTH)"
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--record", type=Path, help="JSON record (default: training.json by --out)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    spec = ResNetTrainSpec(epochs=args.epochs, lr=args.lr, seed=args.seed, width=args.width)
    out = args.out or RECORD_FILE.parent / f"{NAME}.safetensors"
    train_and_save(spec, out, args.record or out.parent / RECORD_FILE.name)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
