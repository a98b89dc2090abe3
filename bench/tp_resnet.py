"""Torch-Pruning 1.6.1 on builtin:resnet18-fashion: L1 channel pruning to half the MACs, fine-tuned.

    .venv/bin/python bench/tp_resnet.py [--steps 1000] [--out bench/results/tp_resnet.json]

The peer side of the structured-pruning benchmark (issue 5). Torch-Pruning's MetaPruner with
``GroupMagnitudeImportance(p=1)`` (group L1 norm, mean over the coupled layers), one pruning
ratio for every layer (``global_pruning=False``), the classifier ``fc`` left whole. The ratio is
found by bisection so that the MACs counted by ``tp.utils.count_ops_and_params`` on one 1x28x28
image are at most half of the dense model's: the smallest ratio (to 1/4096) that gets there.

Fine-tuning is :func:`finetune`: slimtorch's own training loop (``slimtorch.calibrate.train``)
on the Fashion-MNIST train split with :data:`FINETUNE` (SGD momentum 0.9, lr 0.01, weight decay
5e-4, batch 128, cosine to 0 over ``--steps``); slimtorch's structured pruning uses the same
function (or the same ``train:`` block in a recipe), so both sides get the same schedule.

Measured on the dense model, the pruned one and the fine-tuned one: parameters, MACs, top-1 on
the 10,000 Fashion-MNIST test images and the bytes of the model's ``state_dict`` saved as
safetensors; median and fastest latency at batch 32 and batch 1 with one thread, the dense and
the pruned model taking turns run by run so that other load on the machine hits both alike.
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch_pruning as tp
from safetensors.torch import save_file
from torch import nn

import harness
from slimtorch.calibrate.tasks import make_task
from slimtorch.calibrate.train import TrainOptions, train
from slimtorch.core.context import Context
from slimtorch.models.registry import load_model
from slimtorch.zoo.data_images import load_fashion_mnist
from slimtorch.zoo.evaluators import image_accuracy as accuracy

MODEL = "builtin:resnet18-fashion"
DATA = "builtin:fashion-mnist"
MAC_TARGET = 0.5
# The fine-tuning schedule both sides use: TrainOptions fields (a recipe's `train:` block).
FINETUNE: dict[str, Any] = {
    "lr": 0.01,
    "batch_size": 128,
    "optimizer": "sgd",
    "weight_decay": 5e-4,
    "lr_schedule": "cosine",
}


def finetune(model: nn.Module, steps: int, data: str = DATA, seed: int = 0) -> list[float]:
    """Fine-tune ``model`` in place for ``steps`` steps of :data:`FINETUNE`; the loss per step."""
    options = TrainOptions(steps=steps, **FINETUNE)
    task = make_task("classification", data)
    return train(model, task, Context(seed=seed, progress=False), options)


def example_input() -> torch.Tensor:
    return torch.randn(1, 1, 28, 28, generator=torch.Generator().manual_seed(0))


def macs_and_params(model: nn.Module) -> tuple[int, int]:
    """Torch-Pruning's count of multiply-accumulates (one 1x28x28 image) and parameters."""
    macs, params = tp.utils.count_ops_and_params(model, example_input())
    return int(macs), int(params)


def tp_prune(model: nn.Module, ratio: float, round_to: int | None = None) -> nn.Module:
    """Prune ``ratio`` of every coupled channel group by group L1 norm, in place; fc kept whole;
    ``round_to``: kept channels rounded down to a multiple of it."""
    pruner = tp.pruner.MetaPruner(
        model,
        example_input(),
        importance=tp.importance.GroupMagnitudeImportance(p=1),
        pruning_ratio=ratio,
        global_pruning=False,
        round_to=round_to,
        ignored_layers=[m for m in model.modules() if isinstance(m, nn.Linear)],
    )
    pruner.step()
    return model


def search_ratio(
    model: nn.Module, target: float = MAC_TARGET, iters: int = 12, round_to: int | None = None
) -> float:
    """The smallest pruning ratio (to 2**-iters) whose pruned copy has <= ``target`` x the MACs."""
    dense, _ = macs_and_params(model)
    lo, hi = 0.0, 1.0  # MACs(lo) > target, MACs(hi) <= target
    for _ in range(iters):
        mid = (lo + hi) / 2
        macs, _ = macs_and_params(tp_prune(copy.deepcopy(model), mid, round_to))
        if macs <= target * dense:
            hi = mid
        else:
            lo = mid
    return hi


def saved_bytes(model: nn.Module) -> int:
    """Bytes of the model's ``state_dict`` written as one safetensors file."""
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    with tempfile.TemporaryDirectory(prefix="slimtorch-tp-") as tmp:
        path = Path(tmp) / "model.safetensors"
        save_file(tensors, str(path))
        return path.stat().st_size


def paired_latency(
    models: dict[str, nn.Module], batch: int, rounds: int
) -> dict[str, dict[str, float]]:
    """Median and fastest ms of one forward pass on ``batch`` images per model, one thread.

    The models take turns within each round, so a load spike from other processes on the
    machine hits all of them alike and the ratio stays fair. On a shared virtual machine the
    median still moves by 20-40% between runs; the fastest run estimates the time without
    interference and its ratios repeat better.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    x = torch.randn(batch, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    calls = {name: (lambda m=model: m(x)) for name, model in models.items()}
    try:
        with torch.inference_mode():
            for model in models.values():
                model.eval()
            times = harness.interleaved(calls, rounds, warmup=3)
    finally:
        torch.set_num_threads(threads)
    return {name: t.summary(3) for name, t in times.items()}


def paired_latency_ms(models: dict[str, nn.Module], batch: int, rounds: int) -> dict[str, float]:
    """Median ms per model of :func:`paired_latency`."""
    return {name: ms["median"] for name, ms in paired_latency(models, batch, rounds).items()}


def measure(model: nn.Module, test: tuple[torch.Tensor, torch.Tensor]) -> dict[str, Any]:
    macs, params = macs_and_params(model)
    return {
        "params": params,
        "macs": macs,
        "accuracy": round(accuracy(model, *test), 2),
        "bytes_on_disk": saved_bytes(model),
    }


def channel_widths(model: nn.Module) -> dict[str, int]:
    """Output channels of every Conv2d, by module name (the shape TP's pruning left)."""
    return {n: m.out_channels for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}


def run(model_spec: str, steps: int, repeats: int, test_images: int | None) -> dict[str, Any]:
    """Dense baseline, TP pruning at half the MACs, fine-tuning: the whole record."""
    test_x, test_y = load_fashion_mnist("test")
    test = (test_x[:test_images], test_y[:test_images])
    model = load_model(model_spec).model
    dense = copy.deepcopy(model)
    base = measure(model, test)
    with harness.stopwatch() as prune_s:
        ratio = search_ratio(model)
        tp_prune(model, ratio)
    pruned = measure(model, test)
    with harness.stopwatch() as finetune_s:
        losses = finetune(model, steps) if steps else []
    tuned = measure(model, test)
    for batch, rounds in ((32, repeats), (1, repeats * 5)):
        ms = paired_latency_ms({"dense": dense, "pruned": model}, batch, rounds)
        base[f"latency_b{batch}_ms"], tuned[f"latency_b{batch}_ms"] = ms["dense"], ms["pruned"]
    return {
        "baseline": base,
        "pruning_ratio": ratio,
        "mac_ratio": round(pruned["macs"] / base["macs"], 4),
        "param_ratio": round(pruned["params"] / base["params"], 4),
        "pruned": pruned,
        "finetuned": tuned,
        "finetune": {"steps": steps, **FINETUNE},
        "finetune_loss_first_last": [losses[0], losses[-1]] if losses else None,
        "prune_seconds": round(prune_s.seconds, 1),
        "finetune_seconds": round(finetune_s.seconds, 1),
        "widths": channel_widths(model),
        "test_images": len(test[1]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=MODEL, help="model spec for load_model")
    parser.add_argument("--steps", type=int, default=1000, help="fine-tuning steps")
    parser.add_argument("--repeats", type=int, default=20, help="latency runs (batch 1: x5)")
    parser.add_argument("--threads", type=int, default=2, help="threads for fine-tuning")
    parser.add_argument("--test-images", type=int, default=None, help="first N test images")
    parser.add_argument("--out", type=Path, default=harness.result_path("tp_resnet.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with harness.stopwatch() as wall:
        result = run(args.model, args.steps, args.repeats, args.test_images)
    command = f"bench/tp_resnet.py --steps {args.steps}"
    if args.model != MODEL:
        command += f" --model {args.model}"
    if args.test_images:
        command += f" --test-images {args.test_images}"
    env = harness.environment(["torch-pruning"])
    record = {
        "command": command,
        "model": args.model,
        "method": "torch-pruning MetaPruner, GroupMagnitudeImportance(p=1), local, fc ignored",
        "torch": env["torch"],
        "torch_pruning": env["packages"]["torch-pruning"],
        "machine": env["machine"],
        "threads_finetune": args.threads,
        "latency": f"median of {args.repeats} runs at batch 32 ({args.repeats * 5} at batch 1),"
        " 1 thread, dense and pruned models taking turns (finetuned: the pruned model's)",
        **result,
        "wall_seconds": round(wall.seconds),
        "environment": env,
    }
    harness.write_result(args.out, record)
    print(json.dumps({k: record[k] for k in ("pruning_ratio", "mac_ratio", "param_ratio")}))
    for key in ("baseline", "pruned", "finetuned"):
        print(key, json.dumps(record[key]))


if __name__ == "__main__":
    main()
