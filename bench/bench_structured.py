"""Structured pruning on CNNs: permutation before 2:4, one artifact at several widths.

    .venv/bin/python bench/bench_structured.py --only permute [--models lenet5-fashion,minilm]
    .venv/bin/python bench/bench_structured.py --only widths [--model resnet18-fashion]
    .venv/bin/python bench/bench_structured.py --only resnet [--steps 1000] [--seeds 1]

permute: quality after 2:4 magnitude pruning (`prune.nm`, no fine-tuning) of every Linear/Conv
with and without `prune.permute` first (channel permutation through the dependency graph: only
orders the model allows), plus the share of |w| the 2:4 masks keep.

widths: `prune.reorder` (L1 importance order) then `slimtorch.save`; the artifact loaded with
`slimtorch.load(dir, width=w)` for w in 1, 0.75, 0.5: parameters, bytes of the narrowed model
saved again, latency (batch 32 and 1, one thread, median) and accuracy, and the same widths
after a short fine-tune of each narrowed model (`--finetune-steps`).

resnet: builtin:resnet18-fashion pruned to half its MACs by Torch-Pruning 1.6.1
(bench/tp_resnet.py: MetaPruner, GroupMagnitudeImportance(p=1), global_pruning=False, ratio
bisected to half the MACs) and by slimtorch (`prune.structured`, group L1, one ratio for every
group, `flops` set to the FLOPs Torch-Pruning's model kept as slimtorch counts them, fc left
whole), kept channels of every group a multiple of `--round-to` (8: a whole AVX2 vector; Torch-Pruning's
`round_to` and our `round_to`, both rounding down), both fine-tuned with the same function and steps (`--seeds N`: N fine-tuning seeds for
both, from the same pruned models), side by side in one run: parameters, MACs (Torch-Pruning's
counter for both), accuracy on the 10,000 test images, latency at batch 32 and 1 (one thread)
and bytes on disk. slimtorch's numbers are of the model loaded back from its artifact
(`slimtorch.load`). The "_fused" rows are the deployment step `fuse.conv_bn_relu` (every
BatchNorm folded into the convolution before it, a following ReLU fused into oneDNN's kernel
where the module is not shared), applied alike to the dense, Torch-Pruning and slimtorch
models (ours saved and loaded again).

Results: bench/results/structured.json (one key per section).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

import harness
import slimtorch as st
from slimtorch.api import artifact_size, get_metadata, set_architecture
from slimtorch.calibrate.inputs import count_flops
from slimtorch.calibrate.tasks import make_task
from slimtorch.core.context import Context
from slimtorch.eval.latency import measure_latency_ms
from slimtorch.formats.state import iter_states
from slimtorch.models.registry import builtin_info, load_model

RESULTS = harness.result_path("structured.json")


def _loaded(name: str) -> nn.Module:
    loaded = load_model(f"builtin:{name}")
    set_architecture(loaded.model, loaded.architecture)
    get_metadata(loaded.model).update(
        {"source": f"builtin:{name}", "evaluator": loaded.evaluator, "data": loaded.data}
    )
    return loaded.model


def _quality(model: nn.Module, ctx: Context) -> float:
    return float(st.evaluate(model, ctx=ctx)["value"])


def _kept_share(model: nn.Module, original: nn.Module) -> float:
    """|w| kept by the masks over |w| of the same tensors before pruning (permutation-free)."""
    kept = total = 0.0
    for mname, module, param, state in iter_states(model):
        if state.mask is None:
            continue
        w = getattr(module, param).detach()
        kept += float((w * state.mask).abs().sum())
        orig = original.get_submodule(mname) if mname else original
        total += float(getattr(orig, param).detach().abs().sum())
    return kept / total if total else float("nan")


def permute(models: list[str], ctx: Context) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in models:
        model = _loaded(name)
        targets = ["Linear", "Conv2d"]
        ignore = ["conv1"] if name.startswith("lenet") else []  # one input channel: no 2:4
        nm = {"method": "prune.nm", "n": 2, "m": 4, "targets": targets, "ignore": ignore}
        plain = {"stages": [nm]}
        permuted = {"stages": [{"method": "prune.permute"}, *plain["stages"]]}
        row: dict[str, Any] = {"original": _quality(model, ctx)}
        for label, recipe in (("nm24", plain), ("permute+nm24", permuted)):
            result = st.compress(model, recipe, ctx=ctx)
            row[label] = _quality(result.model, ctx)
            row[f"{label}_kept_share"] = _kept_share(result.model, model)
        out[name] = row
        print(name, json.dumps(row), flush=True)
    return out


def _latency(model: nn.Module, name: str, batch: int) -> float:
    inputs = builtin_info(name).example_inputs(batch)
    return measure_latency_ms(model, inputs, warmup=3, repeats=15)


def widths(name: str, finetune_steps: int, slimmable_steps: int, ctx: Context) -> dict[str, Any]:
    model = _loaded(name)
    ordered = st.compress(model, {"stages": [{"method": "prune.reorder"}]}, ctx=ctx).model
    rows = []
    info = builtin_info(name)
    needs_task = finetune_steps or slimmable_steps
    task = make_task(info.task or "classification", info.data) if needs_task else None
    with tempfile.TemporaryDirectory(prefix="bench-widths-") as tmp:
        st.save(ordered, Path(tmp) / "ordered")
        if task is not None and slimmable_steps:  # one artifact, every width trained together
            train = {"steps": slimmable_steps, "lr": 0.001, "batch_size": 64}
            stage = {"method": "train.slimmable", "widths": [1.0, 0.75, 0.5], "train": train}
            slim = st.compress(ordered, {"stages": [stage]}, data=task, ctx=ctx).model
            st.save(slim, Path(tmp) / "slim")
        for width in (1.0, 0.75, 0.5):
            narrowed = st.load(Path(tmp) / "ordered", width=width)
            st.save(narrowed, Path(tmp) / f"w{width}")
            row = {
                "width": width,
                "params": sum(p.numel() for p in narrowed.parameters()),
                "bytes": artifact_size(Path(tmp) / f"w{width}"),
                "latency_ms_b32": _latency(narrowed, name, 32),
                "latency_ms_b1": _latency(narrowed, name, 1),
                "quality": _quality(narrowed, ctx),
            }
            if task is not None and width < 1.0:
                tuned = copy.deepcopy(narrowed)
                recipe = {
                    "stages": [
                        {
                            "method": "train.finetune",
                            "train": {"steps": finetune_steps, "lr": 0.001, "batch_size": 64},
                        }
                    ]
                }
                tuned = st.compress(tuned, recipe, data=task, ctx=ctx).model
                row["quality_finetuned"] = _quality(tuned, ctx)
            if task is not None and slimmable_steps:
                row["quality_slimmable"] = _quality(st.load(Path(tmp) / "slim", width=width), ctx)
            rows.append(row)
            print(json.dumps(row), flush=True)
    return {
        "model": name,
        "finetune_steps": finetune_steps,
        "slimmable_steps": slimmable_steps,
        "rows": rows,
    }


def resnet(steps: int, repeats: int, seeds: list[int], round_to: int) -> dict[str, Any]:
    sys.path.insert(0, str(Path(__file__).parent))
    import tp_resnet  # the peer side, same measurement and fine-tuning functions
    from slimtorch.zoo.data_images import load_fashion_mnist

    test = load_fashion_mnist("test")
    dense = _loaded("resnet18-fashion")
    peer = copy.deepcopy(dense)
    ratio = tp_resnet.search_ratio(peer, round_to=round_to)
    tp_resnet.tp_prune(peer, ratio, round_to)
    x = (tp_resnet.example_input(),)
    flops = count_flops(peer, x) / count_flops(dense, x)  # TP's FLOPs, as slimtorch counts them
    peer_pruned = copy.deepcopy(peer)
    tp_resnet.finetune(peer, steps, seed=seeds[0])
    recipe = {
        "stages": [
            {
                "method": "prune.structured",
                "flops": flops,
                "importance": "l1",
                "ignore": ["fc"],
                "round_to": round_to,
            }
        ]
    }
    ours_pruned = st.compress(dense, recipe).model
    ours = copy.deepcopy(ours_pruned)
    tp_resnet.finetune(ours, steps, seed=seeds[0])
    # more fine-tuning seeds for both: is an accuracy gap more than the seed's noise?
    seed_acc: dict[str, list[float]] = {"torch_pruning": [], "slimtorch": []}
    for seed in seeds[1:]:
        for name, start in (("torch_pruning", peer_pruned), ("slimtorch", ours_pruned)):
            trial = copy.deepcopy(start)
            tp_resnet.finetune(trial, steps, seed=seed)
            seed_acc[name].append(round(tp_resnet.measure(trial, test)["accuracy"], 2))
    # deployment: BN folded into the conv before it, a following ReLU fused where it can be
    fuse = {"stages": [{"method": "fuse.conv_bn_relu"}]}
    with tempfile.TemporaryDirectory(prefix="bench-structured-") as tmp:
        st.save(ours, Path(tmp) / "a")
        loaded = st.load(Path(tmp) / "a")
        ours_bytes = artifact_size(Path(tmp) / "a")
        st.save(st.compress(loaded, fuse).model, Path(tmp) / "f")
        loaded_fused = st.load(Path(tmp) / "f")
        fused_bytes = artifact_size(Path(tmp) / "f")
    models = {
        "dense": dense,
        "torch_pruning": peer,
        "slimtorch": loaded,
        "dense_fused": st.compress(dense, fuse).model,
        "torch_pruning_fused": st.compress(peer, fuse).model,
        "slimtorch_fused": loaded_fused,
    }
    out: dict[str, Any] = {name: tp_resnet.measure(m, test) for name, m in models.items()}
    out["slimtorch"]["artifact_bytes"] = ours_bytes
    out["slimtorch_fused"]["artifact_bytes"] = fused_bytes
    out["slimtorch_before_finetune"] = tp_resnet.measure(ours_pruned, test)
    out["slimtorch_flops_ours"] = count_flops(ours, x)
    out["torch_pruning_flops_ours"] = count_flops(peer, x)
    for name, accs in seed_acc.items():
        out[name]["accuracy_seeds"] = [out[name]["accuracy"], *accs]
    for batch, rounds in ((32, repeats), (1, repeats * 5)):
        ms = tp_resnet.paired_latency(models, batch, rounds)
        for name in models:
            out[name][f"latency_b{batch}_ms"] = ms[name]["median"]
            out[name][f"latency_b{batch}_min_ms"] = ms[name]["min"]
    out["widths"] = {
        "torch_pruning": tp_resnet.channel_widths(peer),
        "slimtorch": tp_resnet.channel_widths(loaded),
    }
    for name in models:
        for stat, key in (("median", ""), ("min", "min_")):
            out[name][f"speedup_b32_{stat}"] = round(
                out["dense"][f"latency_b32_{key}ms"] / out[name][f"latency_b32_{key}ms"], 3
            )
    print(json.dumps(out), flush=True)
    return {**out, "steps": steps, "torch_pruning_ratio": ratio, "round_to": round_to}


def scaling(repeats: int) -> dict[str, Any]:
    """Random-weight ResNet18Small at base widths 8/16/32 against every width cut to about half
    the MACs (6/11/22): how much of halved MACs turns into speed at batch 32 on one thread."""
    sys.path.insert(0, str(Path(__file__).parent))
    import tp_resnet
    from slimtorch.zoo.resnet import ResNet18Small

    pairs = ((8, 6), (16, 11), (32, 22))
    models = {f"width{w}": ResNet18Small(w).eval() for pair in pairs for w in pair}
    ms = tp_resnet.paired_latency_ms(models, 32, repeats)
    macs = {name: tp_resnet.macs_and_params(m)[0] for name, m in models.items()}
    return {
        f"{a}->{b}": {
            "mac_ratio": round(macs[f"width{b}"] / macs[f"width{a}"], 3),
            "b32_ms": [ms[f"width{a}"], ms[f"width{b}"]],
            "speedup_b32": round(ms[f"width{a}"] / ms[f"width{b}"], 3),
        }
        for a, b in pairs
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", choices=["permute", "widths", "resnet", "scaling"], required=True)
    parser.add_argument("--steps", type=int, default=1000, help="fine-tuning steps (resnet)")
    parser.add_argument("--repeats", type=int, default=20, help="latency runs (resnet)")
    parser.add_argument("--seeds", type=int, default=1, help="fine-tuning seeds (resnet)")
    parser.add_argument(
        "--round-to", type=int, default=8, help="kept channels a multiple of this (resnet, both)"
    )
    parser.add_argument("--models", default="lenet5-fashion,minilm")
    parser.add_argument("--model", default="resnet18-fashion")
    parser.add_argument("--finetune-steps", type=int, default=300)
    parser.add_argument(
        "--slimmable-steps", type=int, default=0, help="widths: train.slimmable steps (0: skip)"
    )
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ctx = Context(progress=False)
    if args.only == "permute":
        section: dict[str, Any] = permute(args.models.split(","), ctx)
    elif args.only == "resnet":
        section = resnet(args.steps, args.repeats, list(range(args.seeds)), args.round_to)
    elif args.only == "scaling":
        section = scaling(args.repeats)
    else:
        section = widths(args.model, args.finetune_steps, args.slimmable_steps, ctx)
    results = harness.read_result(RESULTS, {})
    env = harness.environment(["torch-pruning"])
    results[args.only] = {
        **section,
        "command": env["command"],
        "machine": env["machine"],
        "threads": args.threads,
        "torch": env["torch"],
        "environment": env,
    }
    harness.write_result(RESULTS, results, indent=2)


if __name__ == "__main__":
    main()
