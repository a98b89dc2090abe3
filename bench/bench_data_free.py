"""Data-free recovery (distill.data_free) against fine-tuning on 1,000 real images and against none.

    .venv/bin/python bench/bench_data_free.py [--models lenet5,resnet18] [--scenarios p95,p90-int4]
                                              [--steps lenet5=300,resnet18=60] [--n-real 1000]
                                              [--out bench/results/data_free.json]

For each builtin Fashion-MNIST classifier (builtin:lenet5-fashion, builtin:resnet18-fashion) and
each damage scenario:

* ``p95``: 95% global magnitude pruning (prune.magnitude, scope global);
* ``p90-int4``: 90% global magnitude pruning, then 4-bit per-channel weights (quantize.rtn),
  with the recovery between the two (as the sparse90-int8 preset places its fine-tuning);

three recoveries at the same step budget, batch 64, Adam lr 1e-3, cosine schedule:

* ``none``: the damage alone;
* ``data_free``: distill.data_free with its defaults (generator warm-up 50 steps on the priors,
  one adversarial generator step per student step, KL disagreement; the teacher is the original
  model, its BatchNorm statistics the prior where it has them). No real image is read.
* ``finetune_1k``: train.finetune (labels, cross-entropy) on a seeded random subset of 1,000
  Fashion-MNIST training images (numpy default_rng(0)), written to a .npz.

Every model is saved, reloaded with ``slimtorch.load`` and scored on the 10,000-image test split
(top-1 %); wall seconds of the compress call are recorded (two shared CPU cores, one thread:
noisy). Results go to --out (default bench/results/data_free.json).

``--only gan``: a GAN generator compressed. The DCGAN of ``slimtorch.zoo.train_dcgan`` (seeded,
1,200 steps at batch 32; trained here unless --gan-weights exists) has its convolution channels
cut by prune.structured (``--gan-ratio``, l1 importance) and is then distilled from the original
generator (distill.finetune, pixel MSE on the same noise: a fixed pool of 8,192 latent vectors,
``--gan-steps`` steps at batch 64, Adam lr 1e-3), and then given 8-bit per-channel weights
(quantize.rtn). Sample quality is a Frechet distance computed
on the 500-d penultimate features (fc1 after ReLU) of our Fashion-MNIST classifier
builtin:lenet5-fashion between 5,000 generated images and the 10,000 test images (NOT the
Inception FID: comparable only within this table); "real" is 5,000 training images against the
same test set (the floor). Size: parameters and the artifact's bytes; latency: median ms to
generate a batch of 64 (one thread) with the model reloaded by ``slimtorch.load``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

import harness
import slimtorch as st
from slimtorch.api import set_architecture
from slimtorch.core.context import Context
from slimtorch.core.info import update_info
from slimtorch.eval.fid import feature_fid, module_features
from slimtorch.eval.latency import measure_latency_ms
from slimtorch.models.registry import load_model
from slimtorch.testing.tasks import tensor_task
from slimtorch.zoo import train_dcgan
from slimtorch.zoo.data_images import load_fashion_mnist, to_model_input
from slimtorch.zoo.tasks import ClassificationTask

OUT_DEFAULT = harness.result_path("data_free.json")
MODELS = {"lenet5": "builtin:lenet5-fashion", "resnet18": "builtin:resnet18-fashion"}
SCENARIOS: dict[str, tuple[list[dict[str, Any]], list[dict[str, Any]]]] = {
    "p95": ([{"method": "prune.magnitude", "sparsity": 0.95, "scope": "global"}], []),
    "p90-int4": (
        [{"method": "prune.magnitude", "sparsity": 0.9, "scope": "global"}],
        [{"method": "quantize.rtn", "bits": 4, "granularity": "per_channel"}],
    ),
}
TRAIN = {"lr": 1e-3, "batch_size": 64, "lr_schedule": "cosine"}


def _subset_npz(n: int, seed: int, directory: Path) -> Path:
    images, labels = load_fashion_mnist("train")
    idx = np.random.default_rng(seed).choice(len(labels), size=n, replace=False)
    path = directory / f"fashion-train-{n}-seed{seed}.npz"
    np.savez(path, images=images.numpy()[idx], labels=labels.numpy()[idx].astype(np.uint8))
    return path


@torch.no_grad()
def _top1(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    correct = 0
    for start in range(0, len(labels), 500):
        logits = model(to_model_input(images[start : start + 500]))
        correct += int((logits.argmax(1) == labels[start : start + 500]).sum())
    return round(100.0 * correct / len(labels), 2)


def _recovery(kind: str, steps: int) -> list[dict[str, Any]]:
    train = {**TRAIN, "steps": steps}
    if kind == "none":
        return []
    if kind == "data_free":
        return [{"method": "distill.data_free", "train": train}]
    return [{"method": "train.finetune", "train": train}]


def run_case(spec: str, stages: list[dict[str, Any]], data: Any, work: Path) -> dict[str, Any]:
    loaded = load_model(spec)
    set_architecture(loaded.model, loaded.architecture)
    start = time.perf_counter()
    result = st.compress(loaded.model, stages, data=data, ctx=Context(progress=False))
    seconds = time.perf_counter() - start
    out = work / "artifact"
    st.save(result.model, out, force=True)
    test_x, test_y = load_fashion_mnist("test")
    return {"accuracy": _top1(st.load(out), test_x, test_y), "seconds": round(seconds, 1)}


def _generator(weights: Path, steps: int) -> torch.nn.Module:
    if not weights.is_file():
        print("training the DCGAN ->", weights, flush=True)
        train_dcgan.train_and_save(train_dcgan.GanSpec(steps=steps), weights)
    gen = train_dcgan.generator()
    gen.load_state_dict(load_file(str(weights)))
    update_info(gen, input={"shape": [64, train_dcgan.LATENT], "dtype": "float32"})
    set_architecture(gen, {"kind": "factory", "ref": "slimtorch.zoo.train_dcgan:generator"})
    return gen.eval()


def _gan_row(gen: torch.nn.Module, real: torch.Tensor, work: Path) -> dict[str, Any]:
    """FID on classifier features, parameters, bytes and batch-64 latency of ``gen`` reloaded."""
    out = work / "gen"
    st.save(gen, out, force=True)
    loaded = st.load(out, trust_factory=True).eval()
    z = torch.randn(5000, train_dcgan.LATENT, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        images = torch.cat([loaded(z[i : i + 500]) for i in range(0, 5000, 500)])
    fake = _features(to_model_input(train_dcgan.to_pixels(images)))
    batch = z[:64]
    return {
        "fid_lenet5_features": round(feature_fid(real, fake), 2),
        "params": sum(p.numel() for p in loaded.parameters()),
        "bytes": sum(f.stat().st_size for f in out.iterdir() if f.is_file()),
        "latency_ms_b64": round(measure_latency_ms(loaded, (batch,), warmup=3, repeats=20), 3),
    }


def _features(inputs: torch.Tensor) -> torch.Tensor:
    classifier = load_model("builtin:lenet5-fashion").model
    return module_features(classifier, "fc1", inputs, after=torch.relu)


def run_gan(args: argparse.Namespace) -> int:
    gen = _generator(args.gan_weights, args.gan_train_steps)
    test_x, _ = load_fashion_mnist("test")
    train_x, _ = load_fashion_mnist("train")
    real = _features(to_model_input(test_x))
    idx = np.random.default_rng(0).choice(len(train_x), size=5000, replace=False)
    record: dict[str, Any] = harness.read_result(args.out, {})
    rows = record.setdefault("gan", {})
    rows["real_train_5k"] = {"fid_lenet5_features": round(feature_fid(real, _features(
        to_model_input(train_x[idx]))), 2)}  # fmt: skip
    noise = torch.randn(8192, train_dcgan.LATENT, generator=torch.Generator().manual_seed(0))
    prune = {"method": "prune.structured", "ratio": args.gan_ratio}
    distill = {"method": "distill.finetune", "distill": {"output_loss": "mse"},
               "train": {"steps": args.gan_steps, "lr": 1e-3, "batch_size": 64}}  # fmt: skip
    int8 = {"method": "quantize.rtn", "bits": 8, "granularity": "per_channel"}
    cases = {
        "original": [],
        "pruned": [prune],
        "pruned+distilled": [prune, distill],
        "pruned+distilled+int8": [prune, distill, int8],
    }
    with tempfile.TemporaryDirectory() as tmp:
        for name, stages in cases.items():
            start = time.perf_counter()
            model = gen
            if stages:
                model = st.compress(
                    gen, stages, data=tensor_task(noise), ctx=Context(progress=False)
                ).model
            row = {**_gan_row(model, real, Path(tmp)), "stages": stages}
            row["seconds"] = round(time.perf_counter() - start, 1)
            rows[name] = row
            print(name, row, flush=True)
            harness.save_result(args.out, record)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="lenet5,resnet18")
    parser.add_argument("--scenarios", default="p95,p90-int4")
    parser.add_argument("--steps", default="lenet5=300,resnet18=60")
    parser.add_argument("--recoveries", default="none,data_free,finetune_1k")
    parser.add_argument("--n-real", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=OUT_DEFAULT)
    parser.add_argument("--only", choices=["classifiers", "gan"], default="classifiers")
    parser.add_argument("--gan-weights", type=Path, default=Path("/tmp/st-dcgan/generator.st"))
    parser.add_argument("--gan-ratio", type=float, default=0.5)
    parser.add_argument("--gan-steps", type=int, default=300)
    parser.add_argument("--gan-train-steps", type=int, default=train_dcgan.GanSpec.steps)
    args = parser.parse_args(argv)
    if args.only == "gan":
        torch.set_num_threads(1)
        return run_gan(args)
    torch.set_num_threads(1)
    steps = {k: int(v) for k, v in (kv.split("=") for kv in args.steps.split(","))}
    record: dict[str, Any] = harness.read_result(args.out, {})
    rows = record.setdefault("rows", {})
    with tempfile.TemporaryDirectory() as tmp:
        real = _subset_npz(args.n_real, 0, Path(tmp))
        test_x, test_y = load_fashion_mnist("test")
        for model in args.models.split(","):
            spec = MODELS[model]
            base = load_model(spec).model
            rows[f"{model}/original"] = {"accuracy": _top1(base, test_x, test_y)}
            for scenario in args.scenarios.split(","):
                damage, after = SCENARIOS[scenario]
                for kind in args.recoveries.split(","):
                    stages = [*damage, *_recovery(kind, steps[model]), *after]
                    data = ClassificationTask(str(real)) if kind == "finetune_1k" else None
                    row = run_case(spec, stages, data, Path(tmp))
                    row.update(steps=0 if kind == "none" else steps[model], stages=stages)
                    rows[f"{model}/{scenario}/{kind}"] = row
                    print(model, scenario, kind, row["accuracy"], row["seconds"], flush=True)
                    record["description"] = __doc__.split("\n")[0]
                    harness.save_result(args.out, record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
