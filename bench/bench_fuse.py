"""BatchNorm folding and Conv-BN-ReLU fusion on a small ResNet-style CNN: outputs and latency.

    .venv/bin/python bench/bench_fuse.py [--runs 200] [--threads 1] [--out bench/results/fuse.json]

Model (``resnetish`` below): 32x32 RGB input, a 3x3 stem (16 channels) and three residual
stages of two BasicBlocks each (16, 32, 64 channels; stride 2 with a 1x1 projection at stages
2 and 3), global average pooling and a Linear head: 15 convolutions, each followed by a
BatchNorm2d, as in ResNet (``bias=False``). BatchNorm statistics and affine parameters are
random but seeded (a stand-in for a trained network: folding maths does not depend on them).

Variants, all in eval mode under ``torch.inference_mode()``:

* ``fp32``: the model as built (Conv, BN, ReLU modules);
* ``fuse.batchnorm``: slimtorch, BN folded into each conv (``FusedLayer`` since convs had no
  bias), BN replaced by ``FusedIdentity``;
* ``fuse.conv_bn_relu``: slimtorch, also the ReLU after conv1 of each block and after the stem
  runs inside oneDNN's convolution (``mkldnn._convolution_pointwise``);
* ``conv_bn_relu, plain relu_``: the same modules forced to run the convolution, then an
  in-place ReLU (``FusedLayer.kernel = "plain"``), to separate the oneDNN kernel's share;
* ``conv_bn_relu, saved+loaded``: the previous model written by ``slimtorch.save`` and rebuilt
  by ``slimtorch.load``;
* ``torch.fx fuse``: the peer, ``torch.fx.experimental.optimization.fuse`` (folds Conv-BN only).

Latency: median wall time of one forward, variants timed in interleaved rounds, ``--runs``
timed runs per batch size (a tenth of them at batch 32) after 10 warm-up runs; the minimum is
recorded too (on a shared machine it is the steadier number). ``max |diff|``
is the largest absolute difference of the logits to ``fp32`` on a seeded random batch.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path

import torch
from torch import nn

import harness
import slimtorch.api as api
from slimtorch.core.context import Context
from slimtorch.core.methods import METHODS, Run
from slimtorch.runtime import RUNTIME_MODULES
from slimtorch.runtime.fused import FusedIdentity, FusedLayer

for _cls in (FusedLayer, FusedIdentity):  # until slimtorch.runtime registers them itself
    if _cls.__name__ not in RUNTIME_MODULES:
        RUNTIME_MODULES.add(_cls.__name__, _cls)


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.proj: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.proj = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )
        self.relu2 = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.relu1(self.bn1(self.conv1(x)))
        return self.relu2(self.bn2(self.conv2(h)) + self.proj(x))


class ResNetish(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU()
        )
        blocks, cin = [], 16
        for cout, stride in ((16, 1), (32, 2), (64, 2)):
            blocks += [Block(cin, cout, stride), Block(cout, cout, 1)]
            cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(64, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.blocks(self.stem(x))
        return self.head(h.mean((2, 3)))


def resnetish() -> nn.Module:
    """The benchmark model with seeded random weights and BatchNorm statistics."""
    torch.manual_seed(0)
    model = ResNetish()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)
    return model.eval()


def _stage(model: nn.Module, method: str) -> nn.Module:
    out = copy.deepcopy(model)
    spec = METHODS.get(method)
    spec.apply(out, spec.config(), Run(Context(progress=False)))
    return out


def _plain_relu(model: nn.Module) -> nn.Module:
    out = copy.deepcopy(model)
    for m in out.modules():
        if isinstance(m, FusedLayer):
            m.kernel = "plain"
    return out


def _saved_loaded(model: nn.Module, tmp: Path) -> nn.Module:
    api.set_architecture(model, {"kind": "factory", "ref": "bench_fuse:resnetish"})
    api.save(model, tmp / "fused")
    return api.load(tmp / "fused", trust_factory=True)  # our own artifact of a factory


def measure(
    variants: dict[str, nn.Module], batch: int, runs: int
) -> dict[str, tuple[float, float]]:
    """``{variant: (median ms, min ms)}``."""
    x = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    calls = {name: (lambda m=m: m(x)) for name, m in variants.items()}
    with torch.inference_mode():  # interleaved, so background load hits every variant alike
        times = harness.interleaved(calls, runs, warmup=10)
    return {k: (t.median, t.fastest) for k, t in times.items()}


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=harness.result_path("fuse.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from torch.fx.experimental.optimization import fuse as fx_fuse

    base = resnetish()
    with tempfile.TemporaryDirectory(prefix="slimtorch-bench-") as tmp:
        relu = _stage(base, "fuse.conv_bn_relu")
        variants = {
            "fp32": base,
            "fuse.batchnorm": _stage(base, "fuse.batchnorm"),
            "fuse.conv_bn_relu": relu,
            "conv_bn_relu, plain relu_": _plain_relu(relu),
            "conv_bn_relu, saved+loaded": _saved_loaded(relu, Path(tmp)),
            "torch.fx fuse": fx_fuse(copy.deepcopy(base)),
        }
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        ref = base(x)
        diff = {k: float((m(x) - ref).abs().max()) for k, m in variants.items()}
    lat1 = measure(variants, 1, args.runs)
    lat32 = measure(variants, 32, max(args.runs // 10, 10))
    rows = [
        {
            "variant": k,
            "params": _params(m),
            "latency_ms_b1": round(lat1[k][0], 4),
            "latency_ms_b32": round(lat32[k][0], 3),
            "min_ms_b1": round(lat1[k][1], 4),
            "min_ms_b32": round(lat32[k][1], 3),
            "speedup_b1": round(lat1["fp32"][0] / lat1[k][0], 3),
            "speedup_b32": round(lat32["fp32"][0] / lat32[k][0], 3),
            "max_abs_diff": diff[k],
        }
        for k, m in variants.items()
    ]
    env = harness.environment()
    result = {
        "model": "resnetish (15 conv + 15 BatchNorm2d, 32x32 input)",
        "threads": args.threads,
        "runs_b1": args.runs,
        "runs_b32": max(args.runs // 10, 10),
        "torch": env["torch"],
        "machine": env["machine"],
        "rows": rows,
        "environment": env,
    }
    harness.write_result(args.out, result, indent=2)
    print(table(rows))


def table(rows: list[dict]) -> str:
    header = ["variant", "params", "ms b1 (median / min)", "ms b32 (median / min)"]
    header += ["speed-up b1", "speed-up b32", "max abs diff"]
    cells = [
        [
            r["variant"],
            r["params"],
            f"{r['latency_ms_b1']:.3f} / {r['min_ms_b1']:.3f}",
            f"{r['latency_ms_b32']:.2f} / {r['min_ms_b32']:.2f}",
            f"{r['speedup_b1']:.2f}x",
            f"{r['speedup_b32']:.2f}x",
            f"{r['max_abs_diff']:.1e}",
        ]
        for r in rows
    ]
    return harness.markdown_table(header, cells, "lrrrrrr")


if __name__ == "__main__":
    main()
