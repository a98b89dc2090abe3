"""Train the builtin LeNets on Fashion-MNIST and write their committed weights and record.

    python -m slimtorch.zoo.train_lenet --model lenet5 --out src/slimtorch/zoo/weights/lenet5-fashion.safetensors
    python -m slimtorch.zoo.train_lenet --write-fallback   # the bundled 2,000-image test subset

Seeded (model init and data order), Adam with a cosine learning-rate decay, fp32 weights.
The record (``weights/training.json``) keeps epochs, lr, seed, time, test accuracy and versions.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from slimtorch.zoo.data_images import FALLBACK_TEST_FILE, load_fashion_mnist, to_model_input
from slimtorch.zoo.lenet import ARCHITECTURES, WEIGHTS_DIR, weights_path

log = logging.getLogger(__name__)

RECORD_FILE = WEIGHTS_DIR / "training.json"
FALLBACK_SIZE = 2000


@dataclass(frozen=True)
class TrainSpec:
    """How one LeNet is trained."""

    arch: str
    epochs: int
    lr: float = 1e-3
    batch_size: int = 128
    seed: int = 0
    schedule: str = "cosine"


DEFAULT_SPECS = {
    "lenet5": TrainSpec("lenet5", epochs=5),
    "lenet300": TrainSpec("lenet300", epochs=10),
}


def train_classifier(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, spec: TrainSpec
) -> list[float]:
    """Train ``model`` on uint8 ``images`` with Adam + cosine decay; returns mean loss per epoch."""
    steps_per_epoch = math.ceil(len(labels) / spec.batch_size)
    total = spec.epochs * steps_per_epoch
    opt = torch.optim.Adam(model.parameters(), lr=spec.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: 0.5 * (1.0 + math.cos(math.pi * step / total))
    )
    gen = torch.Generator().manual_seed(spec.seed)
    model.train()
    losses = []
    for epoch in range(spec.epochs):
        order = torch.randperm(len(labels), generator=gen)
        running = 0.0
        for i in range(steps_per_epoch):
            idx = order[i * spec.batch_size : (i + 1) * spec.batch_size]
            loss = F.cross_entropy(model(to_model_input(images[idx])), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            running += float(loss.detach()) * len(idx)
        losses.append(running / len(labels))
        log.info("epoch %d/%d: train loss %.4f", epoch + 1, spec.epochs, losses[-1])
    model.eval()
    return losses


@torch.no_grad()
def top1_percent(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Percent of ``images`` whose arg-max prediction equals ``labels``."""
    model.eval()
    correct = 0
    for start in range(0, len(labels), 1000):
        logits = model(to_model_input(images[start : start + 1000]))
        correct += int((logits.argmax(1) == labels[start : start + 1000]).sum())
    return 100.0 * correct / max(len(labels), 1)


def _atomic_write(path: Path, write: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; the files ship in the package
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _update_record(record_path: Path, name: str, entry: dict[str, Any]) -> None:
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    record[name] = entry
    text = json.dumps(record, indent=2, sort_keys=True) + "\n"
    _atomic_write(record_path, lambda tmp: Path(tmp).write_text(text))


def train_and_save(spec: TrainSpec, out: Path, record_path: Path | None) -> dict[str, Any]:
    """Train ``spec.arch`` on the full train split, test it, write weights (and the record)."""
    torch.manual_seed(spec.seed)
    model = ARCHITECTURES[spec.arch]()
    train_x, train_y = load_fashion_mnist("train")
    test_x, test_y = load_fashion_mnist("test")
    start = time.perf_counter()
    losses = train_classifier(model, train_x, train_y, spec)
    seconds = time.perf_counter() - start
    return save_classifier(
        model, out, spec.arch, asdict(spec), losses, seconds, (train_x, train_y), (test_x, test_y),
        record_path,
    )  # fmt: skip


def save_classifier(
    model: nn.Module,
    out: Path,
    arch: str,
    config: dict[str, Any],
    losses: list[float],
    seconds: float,
    train: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    record_path: Path | None,
) -> dict[str, Any]:
    """Write a trained Fashion-MNIST classifier's weights atomically and its training record
    (settings, time, test accuracy, parameters, sha256); shared by the builtin CNN trainers."""
    test_x, test_y = test
    tensors = {
        k: (v.float() if v.is_floating_point() else v).detach().contiguous()
        for k, v in model.state_dict().items()
    }
    _atomic_write(out, lambda tmp: save_file(tensors, tmp, metadata={"arch": arch}))
    entry: dict[str, Any] = {
        **config,
        "arch": arch,
        "train_images": len(train[1]),
        "train_seconds": round(seconds, 1),
        "threads": torch.get_num_threads(),
        "final_train_loss": round(losses[-1], 4),
        "test_accuracy": round(top1_percent(model, test_x, test_y), 2),
        "test_images": len(test_y),
        "test_accuracy_first2000": round(top1_percent(model, test_x[:2000], test_y[:2000]), 2),
        "params": sum(p.numel() for p in model.parameters()),
        "sha256": hashlib.sha256(out.read_bytes()).hexdigest(),
        "torch_version": torch.__version__,
    }
    if record_path is not None:
        _update_record(record_path, out.name.removesuffix(".safetensors"), entry)
    log.info("%s: test accuracy %.2f%% after %.0f s", arch, entry["test_accuracy"], seconds)
    return entry


def write_fallback(path: Path = FALLBACK_TEST_FILE, n: int = FALLBACK_SIZE) -> None:
    """Write the first ``n`` Fashion-MNIST test images and labels as a compressed ``.npz``."""
    images, labels = load_fashion_mnist("test")
    subset, targets = images[:n].numpy(), labels[:n].numpy().astype(np.uint8)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, images=subset, labels=targets)

    _atomic_write(path, write)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=sorted(DEFAULT_SPECS))
    parser.add_argument("--out", type=Path, help="weights file (default: the builtin's)")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--record", type=Path, help="JSON record (default: training.json by --out)")
    parser.add_argument("--write-fallback", action="store_true", help="write the 2k test subset")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    if args.write_fallback:
        write_fallback()
    if args.model:
        base = DEFAULT_SPECS[args.model]
        spec = TrainSpec(
            args.model, args.epochs or base.epochs, args.lr or base.lr, base.batch_size, args.seed
        )
        out = args.out or weights_path(f"{args.model}-fashion")
        train_and_save(spec, out, args.record or out.parent / RECORD_FILE.name)
    elif not args.write_fallback:
        parser.error("give --model and/or --write-fallback")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
