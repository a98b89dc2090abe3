"""Model merging on Fashion-MNIST: slimtorch against mergekit 0.1.5 on the same inputs and YAML.

    .venv/bin/python bench/bench_merge.py [--epochs 3] [--dare-seeds 3] [--out bench/results/merge.json]

Inputs. The base is ``builtin:lenet300-fashion`` (LeNet-300-100, 266,610 parameters, trained on
all ten classes, 89.4% top-1). Two copies are fine-tuned from it, seeded, with Adam (lr 1e-3,
cosine decay, batch 128, ``--epochs`` epochs): model A on the training images of classes 0-4 only,
model B on classes 5-9 only, so that each gains on its half and forgets the other. The last 5,000
training images are held out of fine-tuning as a validation split, the only data used to choose
the tuned ``lambda`` of task arithmetic (best validation accuracy over all ten classes; the test
set is never used for a choice). The base itself was trained on those images too, which favours
small ``lambda``. base, A and B are written as plain ``.safetensors`` files.

Merges. One mergekit-format YAML per merge (absolute paths), run unchanged by both tools:
``slimtorch merge CONFIG --out DIR`` (``slimtorch.cli.main.main``) and mergekit's
``mergekit-pytorch CONFIG DIR`` (its click command, in this process, ``--no-cuda``), so that both
times count the merge alone, not Python start-up or imports (one end-to-end command-line run of
each, as subprocesses, is timed separately). Methods: ``linear`` (A and B, 0.5 each: the weighted
average), ``task_arithmetic`` (base + 1.0 * each delta, and with the tuned ``lambda``), ``ties``
(density 0.5 and 0.2, weights 1, mergekit's default normalisation), ``dare_linear`` and
``dare_ties`` (density 0.5, weights 1); then four parity checks with other options: ``slerp``
from A to B, and linear, task arithmetic (unequal weights, normalize, lambda) and TIES merged in
bfloat16 or float16 (mergekit's ``dtype``); then mergekit's newer methods on the same inputs:
``model_stock``, ``nuslerp`` (of A and B, and of their deltas, also in bfloat16), ``multislerp``,
``karcher``, ``sce`` (all elements and ``select_topk`` 0.5), ``arcee_fusion`` (A into the base),
and the random ``della`` / ``della_linear`` (density 0.5, epsilon 0.15). Each merge runs
``--repeats`` times per tool and seed (median time; the outputs of the repeats must be identical).

Measured. Top-1 accuracy (10-way arg-max) on the full 10,000-image test set and on each half's
test images (classes 0-4, classes 5-9) for base, A, B and every merge, by both tools. Every output
tensor of slimtorch is compared with mergekit's: max |difference| and how many are bit-identical.
DARE and DELLA drop delta entries at random and the two tools draw their random numbers differently
(slimtorch: one generator per tensor from ``--seed`` and the tensor name; mergekit: the global
torch generator seeded by ``--random-seed``), so for DARE and DELLA the tensors differ by design
and the comparison is the accuracy over ``--dare-seeds`` seeds of each (given the same generator
state, DELLA's draws are identical: tests/merge/test_merge_mergekit_peer.py).

mergekit is not a dependency of slimtorch; without it the slimtorch half runs and the comparison
is skipped with the install command (``mergekit-pytorch`` needs no GPU)::

    pip install --no-deps mergekit==0.1.5 immutables==0.21 peft==0.21.2 accelerate==1.15.0

(run it with the bench environment's Python, ``.venv-bench/bin/python``, where mergekit is).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file, save_file
from torch import nn

import harness
from slimtorch.cli.main import main as slimtorch_main
from slimtorch.merge import methods as M
from slimtorch.models.registry import load_model
from slimtorch.zoo.data_images import load_fashion_mnist
from slimtorch.zoo.train_lenet import TrainSpec, top1_percent, train_classifier

BASE = "builtin:lenet300-fashion"
LOW, HIGH = (0, 1, 2, 3, 4), (5, 6, 7, 8, 9)
VAL_SIZE = 5000
LAMBDA_GRID = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
MERGEKIT_VERSION = "0.1.5"
MERGEKIT_INSTALL = (
    "pip install --no-deps mergekit==0.1.5 immutables==0.21 peft==0.21.2 accelerate==1.15.0"
)
SdDict = dict[str, torch.Tensor]
Runner = Callable[[Path, Path, int], tuple[SdDict, float]]


@dataclass
class Data:
    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor


@dataclass
class Case:
    """One merge: its mergekit YAML and whether both tools must give identical tensors."""

    name: str
    config: dict[str, Any]
    deterministic: bool
    notes: str = ""
    rows: dict[str, Any] = field(default_factory=dict)


def load_data() -> Data:
    x, y = load_fashion_mnist("train")
    tx, ty = load_fashion_mnist("test")
    n = len(y) - VAL_SIZE
    return Data(x[:n], y[:n], x[n:], y[n:], tx, ty)


def _subset(x: torch.Tensor, y: torch.Tensor, classes: tuple[int, ...]) -> tuple[Any, Any]:
    keep = torch.isin(y, torch.tensor(classes))
    return x[keep], y[keep]


def make_model(sd: SdDict) -> nn.Module:
    model = load_model(BASE).model
    model.load_state_dict(sd)
    return model.eval()


def accuracies(sd: SdDict, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """Top-1 % on all of ``x`` and on each half's images (10-way arg-max)."""
    model = make_model(sd)
    out = {"all": top1_percent(model, x, y)}
    for key, classes in (("low", LOW), ("high", HIGH)):
        out[key] = top1_percent(model, *_subset(x, y, classes))
    return {k: round(v, 2) for k, v in out.items()}


def finetune(base: SdDict, data: Data, classes: tuple[int, ...], epochs: int, seed: int) -> Any:
    torch.manual_seed(seed)
    model = make_model(base)
    x, y = _subset(data.train_x, data.train_y, classes)
    wall = harness.stopwatch()
    losses = train_classifier(model, x, y, TrainSpec("lenet300", epochs=epochs, seed=seed))
    sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    steps = epochs * -(-len(y) // 128)
    info = {"classes": list(classes), "train_images": len(y), "steps": steps, "seed": seed}
    info |= {"final_loss": round(losses[-1], 4), "seconds": round(wall.seconds, 1)}
    return sd, info


def tune_lambda(base: SdDict, a: SdDict, b: SdDict, data: Data) -> tuple[float, dict[str, float]]:
    """The ``lambda`` of task arithmetic (weights 1) with the best validation accuracy."""
    curve = {}
    for lam in LAMBDA_GRID:
        sd = {k: M.task_arithmetic(base[k], [a[k], b[k]], [1.0, 1.0], lam=lam) for k in base}
        curve[str(lam)] = accuracies(sd, data.val_x, data.val_y)["all"]
    best = max(LAMBDA_GRID, key=lambda lam: curve[str(lam)])
    return best, curve


def min_cosine(a: SdDict, b: SdDict) -> float:
    """The smallest cosine similarity between same-named tensors of ``a`` and ``b``."""
    return min(float(torch.cosine_similarity(a[k].flatten(), b[k].flatten(), dim=0)) for k in a)


def make_cases(paths: dict[str, str], lam: float) -> list[Case]:
    a, b, base = paths["A"], paths["B"], paths["base"]

    def task(method: str, density: float | None = None, **glob: Any) -> dict[str, Any]:
        params: dict[str, Any] = {"weight": 1.0}
        if density is not None:
            params["density"] = density
        models = [{"model": m, "parameters": dict(params)} for m in (a, b)]
        cfg: dict[str, Any] = {"merge_method": method, "base_model": base, "models": models}
        if glob:
            cfg["parameters"] = glob
        return cfg

    def linear(w: tuple[float, float], **extra: Any) -> dict[str, Any]:
        models = [
            {"model": m, "parameters": {"weight": wi}} for m, wi in zip((a, b), w, strict=True)
        ]
        return {"merge_method": "linear", "models": models, **extra}

    slerp = {"merge_method": "slerp", "base_model": a, "models": [{"model": b}]}
    skewed = task("task_arithmetic", normalize=True, **{"lambda": 0.8})
    for m, w in zip(skewed["models"], (0.7, 0.4), strict=True):
        m["parameters"]["weight"] = w
    return [
        Case("linear 0.5/0.5", linear((0.5, 0.5)), True, "weighted average of A and B"),
        Case("task_arithmetic λ=1", task("task_arithmetic"), True, "base + ΔA + ΔB"),
        Case(
            f"task_arithmetic λ={lam}",
            task("task_arithmetic", **{"lambda": lam}),
            True,
            "λ chosen on the validation split",
        ),
        Case("ties d=0.5", task("ties", 0.5), True, "top 50% |Δ|, sign election, disjoint mean"),
        Case("ties d=0.2", task("ties", 0.2), True, "top 20% |Δ|"),
        Case("dare_linear d=0.5", task("dare_linear", 0.5), False, "random drop, L1 rescale"),
        Case("dare_ties d=0.5", task("dare_ties", 0.5), False, "random drop + sign election"),
        # parity checks beyond the brief: other options, low-precision merge dtypes
        Case("slerp t=0.5 (A to B)", {**slerp, "parameters": {"t": 0.5}}, True, "spherical"),
        Case(
            "linear 0.25/0.75, bfloat16",
            linear((0.3, 0.9), dtype="bfloat16"),
            True,
            "weights 0.3/0.9 normalised; merged and stored in bfloat16",
        ),
        Case(
            "task_arithmetic 0.7/0.4, normalize, λ=0.8, float16",
            {**skewed, "dtype": "float16"},
            True,
            "merged and stored in float16",
        ),
        Case(
            "ties d=0.5, bfloat16",
            {**task("ties", 0.5), "dtype": "bfloat16"},
            True,
            "merged and stored in bfloat16",
        ),
        # H-MERGE: mergekit 0.1.5's other methods (issue 19 point 6)
        *extra_cases(a, b, base),
    ]


def extra_cases(a: str, b: str, base: str) -> list[Case]:
    """DELLA, Model Stock, NuSLERP, Multi-SLERP, Karcher, SCE and Arcee Fusion on A, B, base."""

    def cfg(method: str, weighted: bool, with_base: bool = True, **glob: Any) -> dict[str, Any]:
        models = [
            {"model": m, **({"parameters": {"weight": 1.0}} if weighted else {})} for m in (a, b)
        ]
        out: dict[str, Any] = {"merge_method": method, "models": models}
        if with_base:
            out["base_model"] = base
        if glob:
            out["parameters"] = glob
        return out

    fusion = {"merge_method": "arcee_fusion", "base_model": base, "models": [{"model": a}]}
    return [
        Case("model_stock", cfg("model_stock", False), True, "angle-weighted pull to the base"),
        Case("nuslerp (A, B)", cfg("nuslerp", True, False), True, "slerp of A and B, t=0.5"),
        Case("nuslerp of deltas", cfg("nuslerp", True), True, "slerp of the deltas from base"),
        Case("multislerp of deltas", cfg("multislerp", True), True, "barycentric slerp"),
        Case("karcher (A, B)", cfg("karcher", False, False), True, "Karcher mean on the sphere"),
        Case("sce", cfg("sce", False), True, "all elements, mean-square weights, TIES"),
        Case("sce topk 0.5", cfg("sce", False, select_topk=0.5), True, "top-variance half"),
        Case("arcee_fusion (A into base)", fusion, True, "A's outstanding changes only"),
        Case("della d=0.5", cfg("della", True, density=0.5), False, "ranked drop + TIES"),
        Case(
            "della_linear d=0.5",
            cfg("della_linear", True, density=0.5),
            False,
            "ranked drop, sum",
        ),
        Case(
            "nuslerp of deltas, bfloat16",
            {**cfg("nuslerp", True), "dtype": "bfloat16"},
            True,
            "merged and stored in bfloat16",
        ),
    ]


def read_dir(out: Path) -> SdDict:
    tensors: SdDict = {}
    for f in sorted(out.glob("*.safetensors")):
        tensors |= load_file(str(f))
    return tensors


def run_slimtorch(cfg: Path, out: Path, seed: int) -> tuple[SdDict, float]:
    argv = ["merge", str(cfg), "--out", str(out), "--force", "--seed", str(seed), "--json"]
    with harness.stopwatch() as sw, contextlib.redirect_stdout(io.StringIO()):
        rc = slimtorch_main(argv)
    if rc != 0:
        raise SystemExit(f"slimtorch merge {cfg} failed with exit code {rc}")
    return read_dir(out), sw.seconds


def mergekit_runner() -> tuple[Runner | None, str]:
    """mergekit-pytorch's click command, or ``None`` and why it cannot run."""
    try:
        version = importlib.metadata.version("mergekit")
        with contextlib.redirect_stderr(io.StringIO()):  # torchao's import-time noise
            from mergekit.scripts.merge_raw_pytorch import main as mk_main
    except Exception as exc:  # mergekit's import chain (transformers, peft, ...) can fail widely
        return None, f"mergekit is not importable ({type(exc).__name__}: {exc})"

    def run(cfg: Path, out: Path, seed: int) -> tuple[SdDict, float]:
        args = [str(cfg), str(out), "--no-cuda", "--quiet", "--random-seed", str(seed)]
        with harness.stopwatch() as sw, contextlib.redirect_stderr(io.StringIO()):
            mk_main.main(args, standalone_mode=False)  # its tqdm bars ignore --quiet
        return read_dir(out), sw.seconds

    return run, version


def compare(ours: SdDict, theirs: SdDict) -> dict[str, Any]:
    if set(ours) != set(theirs):
        return {"same_names": False, "only_ours": sorted(set(ours) - set(theirs))}
    diffs = {k: float((ours[k].double() - theirs[k].double()).abs().max()) for k in ours}
    return {
        "same_names": True,
        "same_dtypes": all(ours[k].dtype == theirs[k].dtype for k in ours),
        "tensors": len(ours),
        "identical_tensors": sum(torch.equal(ours[k], theirs[k]) for k in ours),
        "max_abs_diff": max(diffs.values()),
    }


def _cli(tool: str, cfg: Path, out: Path, hash_seed: str) -> float:
    """Run one tool's command line (merge seed 0) in a fresh process; its wall seconds."""
    if tool == "slimtorch merge":
        cmd = [sys.executable, "-m", "slimtorch.cli.main", "merge", str(cfg), "--force"]
        cmd += ["--seed", "0", "--out", str(out)]
    else:
        exe = Path(sys.executable).parent / "mergekit-pytorch"
        cmd = [str(exe), str(cfg), str(out), "--no-cuda", "--random-seed", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env["PYTHONHASHSEED"] = hash_seed
    with harness.stopwatch() as sw:
        subprocess.run(cmd, check=True, capture_output=True, env=env)
    return round(sw.seconds, 2)


def command_lines(linear: Path, dare: Path, tmp: Path, mergekit: bool) -> dict[str, Any]:
    """Each tool's command line in fresh processes: wall time on ``linear`` (start-up and
    imports included), and whether ``dare`` with seed 0 gives the same tensors in two processes
    that differ only in ``PYTHONHASHSEED`` (Python's string-hash, hence set, order), and in
    two that share it."""
    tools = ["slimtorch merge"] + (["mergekit-pytorch"] if mergekit else [])
    out: dict[str, Any] = {
        "wall_seconds_linear": {},
        "dare_same_across_processes": {},
        "dare_same_with_same_hash_seed": {},
    }
    for i, tool in enumerate(tools):
        out["wall_seconds_linear"][tool] = _cli(tool, linear, tmp / f"cli-{i}", "0")
        runs = []
        for j, hash_seed in enumerate(("1", "2", "1")):
            _cli(tool, dare, tmp / f"cli-{i}-{j}", hash_seed)
            runs.append(read_dir(tmp / f"cli-{i}-{j}"))
        same = [compare(runs[0], r).get("identical_tensors") == len(r) for r in runs[1:]]
        out["dare_same_across_processes"][tool] = same[0]
        out["dare_same_with_same_hash_seed"][tool] = same[1]
    return out


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name).strip("-")


def _mean(rows: list[dict[str, float]]) -> dict[str, float]:
    return {k: round(statistics.fmean(r[k] for r in rows), 2) for k in rows[0]}


def _repeat(run: Runner, cfg: Path, out: Path, seed: int, repeats: int) -> tuple[SdDict, Any]:
    """Run ``repeats`` times: the first output, the median seconds, whether all were equal."""
    outs, secs = [], []
    for _ in range(repeats):
        sd, sec = run(cfg, out, seed)
        outs.append(sd)
        secs.append(sec)
    same = all(compare(outs[0], o).get("identical_tensors") == len(o) for o in outs[1:])
    return outs[0], (statistics.median(secs), same)


def run_case(case: Case, tmp: Path, data: Data, mergekit: Runner | None, args: Any) -> None:
    """Merge ``case`` with both tools (every seed, ``args.repeats`` times each) and score it."""
    cfg = tmp / f"{_slug(case.name)}.yaml"
    cfg.write_text(yaml.safe_dump(case.config, sort_keys=False), encoding="utf-8")
    seeds = [0] if case.deterministic else list(range(args.dare_seeds))
    tools: dict[str, Runner] = {"slimtorch": run_slimtorch}
    if mergekit is not None:
        tools["mergekit"] = mergekit
    case.rows = {
        "method": case.name,
        "config": json.loads(json.dumps(case.config).replace(f"{tmp}/", "")),  # file names only
        "deterministic": case.deterministic,
        "notes": case.notes,
        "seeds": seeds,
    }
    outputs: dict[str, list[SdDict]] = {}
    for tool, run in tools.items():
        accs, secs, same = [], [], []
        for seed in seeds:
            out = tmp / f"out-{tool}-{_slug(case.name)}-{seed}"
            sd, (sec, reproducible) = _repeat(run, cfg, out, seed, args.repeats)
            outputs.setdefault(tool, []).append(sd)
            accs.append(accuracies(sd, data.test_x, data.test_y))
            secs.append(sec)
            same.append(reproducible)
        case.rows[tool] = {
            "accuracy": _mean(accs),
            "per_seed": accs,
            "median_seconds": round(statistics.median(secs), 4),
            "same_output_every_repeat": all(same),
        }
    if mergekit is not None:
        pairs = zip(outputs["slimtorch"], outputs["mergekit"], strict=True)
        comps = [compare(a, b) for a, b in pairs]
        case.rows["tensors"] = comps[0] if case.deterministic else comps


def _retained(acc: dict[str, float], ref: dict[str, dict[str, float]]) -> float:
    """Mean of each half's accuracy as a share of its specialist's (A on 0-4, B on 5-9)."""
    return round(50 * (acc["low"] / ref["A"]["low"] + acc["high"] / ref["B"]["high"]), 1)


def _acc_cells(res: dict[str, Any] | None, ref: dict[str, dict[str, float]]) -> list[str]:
    if res is None:
        return ["-"] * 4
    acc, per = res["accuracy"], res["per_seed"]
    spread = ""
    if len(per) > 1:
        lo, hi = min(p["all"] for p in per), max(p["all"] for p in per)
        spread = f" ({lo:.1f}-{hi:.1f})"
    return [f"{acc['all']:.2f}{spread}", f"{acc['low']:.2f}", f"{acc['high']:.2f}",
            str(_retained(acc, ref))]  # fmt: skip


def _tensor_cell(row: dict[str, Any]) -> str:
    comp = row.get("tensors")
    if comp is None:
        return "not run"
    if not row["deterministic"]:
        return "random (differs by design)"
    if not comp["same_names"]:
        return "tensor names differ"
    return (
        f"{comp['identical_tensors']}/{comp['tensors']} identical, max {comp['max_abs_diff']:.1e}"
    )


def print_table(result: dict[str, Any]) -> None:
    ref = result["inputs"]
    header = ["model / merge", "slimtorch: all", "0-4", "5-9", "retained %", "mergekit: all",
              "0-4", "5-9", "retained %", "tensors slimtorch vs mergekit",
              "ms slimtorch / mergekit"]  # fmt: skip
    cells = []
    for name in ("base", "A", "B"):
        acc = ref[name]
        cells.append(
            [f"{name} ({result['models'][name]})", f"{acc['all']:.2f}", f"{acc['low']:.2f}",
             f"{acc['high']:.2f}", _retained(acc, ref)]
        )  # fmt: skip
    for row in result["merges"]:
        mk = row.get("mergekit")
        ms = f"{1000 * row['slimtorch']['median_seconds']:.0f}"
        ms += f" / {1000 * mk['median_seconds']:.0f}" if mk else " / -"
        cells.append(
            [row["method"], *_acc_cells(row["slimtorch"], ref), *_acc_cells(mk, ref),
             _tensor_cell(row), ms]
        )  # fmt: skip
    print(harness.markdown_table(header, cells, "lrrrrrrrrlr"))


def summarize(merges: list[dict[str, Any]]) -> dict[str, Any]:
    """Counts of bit-identical merges and the DARE accuracy of both tools."""
    det = [m for m in merges if m["deterministic"] and "tensors" in m]
    out: dict[str, Any] = {
        "deterministic_merges": len(det),
        "bit_identical_merges": sum(
            m["tensors"].get("identical_tensors") == m["tensors"].get("tensors") for m in det
        ),
        "max_abs_diff_deterministic": max((m["tensors"]["max_abs_diff"] for m in det), default=0),
        "repeats_identical": all(
            m[t]["same_output_every_repeat"]
            for m in merges
            for t in ("slimtorch", "mergekit")
            if t in m
        ),
    }
    for m in merges:
        if not m["deterministic"] and "mergekit" in m:
            out[m["method"]] = {t: m[t]["accuracy"]["all"] for t in ("slimtorch", "mergekit")}
    return out


def print_summary(result: dict[str, Any]) -> None:
    print(
        "\nAccuracy: top-1 % on the 10,000 Fashion-MNIST test images (all) and on each half's"
        " 5,000 (10-way arg-max); retained % = mean of accuracy on 0-4 / A's and on 5-9 / B's."
        " DARE rows: mean over seeds (range of `all`)."
    )
    summary, cli = result["summary"], result["command_line"]
    wall, same = cli["wall_seconds_linear"], cli["dare_same_across_processes"]
    if "bit_identical_merges" not in summary or not summary["deterministic_merges"]:
        print("\nmergekit comparison skipped: " + MERGEKIT_INSTALL)
        return
    dare = "; ".join(
        f"{k}: {v['slimtorch']:.2f}% slimtorch vs {v['mergekit']:.2f}% mergekit"
        for k, v in summary.items()
        if isinstance(v, dict)
    )
    print(
        f"{summary['bit_identical_merges']} of {summary['deterministic_merges']} deterministic"
        f" merges are bit-identical to mergekit {result['mergekit']} (largest difference"
        f" {summary['max_abs_diff_deterministic']:.1e}). DARE, mean test accuracy over"
        f" {result['dare_seeds']} seeds: {dare}. Command line end to end (linear,"
        f" start-up and imports included): slimtorch merge {wall.get('slimtorch merge')} s,"
        f" mergekit-pytorch {wall.get('mergekit-pytorch')} s. dare_linear with seed 0 run twice in"
        f" fresh processes (different PYTHONHASHSEED): same tensors from slimtorch:"
        f" {same.get('slimtorch merge')}, from mergekit: {same.get('mergekit-pytorch')} (same"
        f" PYTHONHASHSEED: {cli['dare_same_with_same_hash_seed'].get('mergekit-pytorch')})."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=3, help="fine-tuning epochs per half")
    parser.add_argument("--dare-seeds", type=int, default=3, help="seeds per DARE merge")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per merge and seed")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=harness.result_path("merge.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    bench_wall = harness.stopwatch()
    mergekit, mk_info = mergekit_runner()
    if mergekit is None:
        print(f"SKIPPED the mergekit comparison: {mk_info}. Install it with:\n  {MERGEKIT_INSTALL}")
    elif mk_info != MERGEKIT_VERSION:
        print(
            f"note: mergekit {mk_info} installed; these results were made with {MERGEKIT_VERSION}"
        )
    data = load_data()
    base = {k: v.detach().clone() for k, v in load_model(BASE).model.state_dict().items()}
    sd_a, info_a = finetune(base, data, LOW, args.epochs, seed=1)
    sd_b, info_b = finetune(base, data, HIGH, args.epochs, seed=2)
    lam, curve = tune_lambda(base, sd_a, sd_b, data)
    with tempfile.TemporaryDirectory(prefix="slimtorch-bench-merge-") as tmp_name:
        tmp = Path(tmp_name)
        paths = {}
        for name, sd in (("base", base), ("A", sd_a), ("B", sd_b)):
            paths[name] = str(tmp / f"{name}.safetensors")
            save_file({k: v.contiguous() for k, v in sd.items()}, paths[name])
        cases = make_cases(paths, lam)
        for case in cases:
            run_case(case, tmp, data, mergekit, args)
        cli = command_lines(
            tmp / f"{_slug(cases[0].name)}.yaml",
            tmp / f"{_slug(next(c for c in cases if 'dare_linear' in c.name).name)}.yaml",
            tmp,
            mergekit is not None,
        )
    inputs = {
        n: accuracies(sd, data.test_x, data.test_y)
        for n, sd in (("base", base), ("A", sd_a), ("B", sd_b))
    }
    env = harness.environment(["mergekit"])
    result = {
        "command": " ".join(
            [os.path.relpath(sys.executable), "bench/bench_merge.py", *sys.argv[1:]]
        ),
        "models": {
            "base": BASE,
            "A": "fine-tuned on classes 0-4",
            "B": "fine-tuned on classes 5-9",
        },
        "finetune": {"A": info_a, "B": info_b, "epochs": args.epochs, "lr": 1e-3, "batch": 128},
        "test_images": {
            "all": len(data.test_y),
            "low": int((data.test_y < 5).sum()),
            "high": int((data.test_y >= 5).sum()),
        },
        "validation_images": len(data.val_y),
        "lambda_curve_val_accuracy": curve,
        "lambda_tuned": lam,
        "min_cosine_A_B_per_tensor": round(min_cosine(sd_a, sd_b), 6),
        "slerp_linear_fallback_above": M.SLERP_DOT_THRESHOLD,
        "dare_seeds": args.dare_seeds,
        "repeats": args.repeats,
        "inputs": inputs,
        "merges": [c.rows for c in cases],
        "command_line": cli,
        "mergekit": mk_info
        if mergekit is not None
        else {"skipped": mk_info, "install": MERGEKIT_INSTALL},
        "torch": env["torch"],
        "slimtorch": env["slimtorch"],
        "threads": args.threads,
        "machine": f"{env['cpu']}, {env['cpus']} CPUs (shared)",
        "python": env["python"],
        "bench_seconds": round(bench_wall.seconds, 1),
        "environment": env,
    }
    result["summary"] = summarize(result["merges"])
    harness.write_result(args.out, result, indent=2, ensure_ascii=False)
    print_table(result)
    print_summary(result)


if __name__ == "__main__":
    main()
