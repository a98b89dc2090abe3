"""Deep Compression on LeNet-300-100 and LeNet-5: prune, share, Huffman-code; real artifacts.

    .venv/bin/python bench/bench_deep_compression.py [--only fashion|mnist5k] [--recipe NAME]
                                                    [--out bench/results/deep_compression.json]

For each network the `deep-compression` preset runs once through `slimtorch.compress` with the
dataset's training split as --data. The model after its pruning stages ("P"), and after all
stages ("P+Q"), are saved with `slimtorch.save`; P+Q is saved a second time with Huffman coding
("P+Q+H", the preset's format). Each artifact is loaded back with `slimtorch.load`, checked to
give exactly the compressed model's outputs, and its test accuracy measured. The per-layer table
follows Table 2/3 of Han et al. (2016): kept weights, weight and index bits per kept weight
without and with Huffman coding. zstd and lzma over the P+Q file are the generic baselines.

mnist5k: LeNet-300-100 and LeNet-5 are first trained (seeded) on the 4,000 training digits of
`builtin:mnist5k`, then compressed the same way and tested on its 1,000 test digits.
"""

from __future__ import annotations

import argparse
import copy
import lzma
import tempfile
from pathlib import Path
from typing import Any

import torch
import zstandard
from safetensors.torch import load_file
from torch import nn

import harness
import slimtorch as st
from slimtorch.calibrate.tasks import make_task
from slimtorch.core.context import Context
from slimtorch.formats.artifact import MODEL_FILE, read_manifest
from slimtorch.formats.coded import meta_label
from slimtorch.formats.sizes import dense_safetensors_bytes
from slimtorch.models import load_model
from slimtorch.recipe import Recipe, load_recipe
from slimtorch.zoo.data_images import load_mnist5k
from slimtorch.zoo.evaluators import evaluate_accuracy
from slimtorch.zoo.lenet import ARCHITECTURES
from slimtorch.zoo.train_lenet import TrainSpec, train_classifier

PAPER = {"lenet300": 40, "lenet5": 39}  # compression rates of Han et al. 2016, Table 1
EXTRA_95 = "examples/recipes/deep-compression-95.yaml"  # a second, smaller LeNet-5 point


def _split(recipe: Recipe) -> tuple[Recipe, Recipe]:
    """Stages up to the last pruning/fine-tuning stage, and the rest (sharing onwards)."""
    first = next(i for i, s in enumerate(recipe.stages) if s.spec.name.startswith("share."))
    head = Recipe(recipe.stages[:first], recipe.format, recipe.name)
    tail = Recipe(recipe.stages[first:], recipe.format, recipe.name)
    return head, tail


def _part_bytes(path: Path) -> dict[str, int]:
    tensors = load_file(str(path / MODEL_FILE))
    return {k: t.numel() * t.element_size() for k, t in tensors.items()}


def _layer_rows(path: Path) -> dict[str, dict[str, Any]]:
    manifest = read_manifest(path)
    parts = _part_bytes(path)
    rows = {}
    for name, meta in manifest["tensors"].items():
        if not name.endswith("weight"):
            continue
        kept = max(int(meta["nonzero"]), 1)
        own = {k.split("::", 1)[1]: v for k, v in parts.items() if k.split("::", 1)[0] == name}
        index = sum(v for k, v in own.items() if k in ("mask",) or k.startswith(("gaps", "csr")))
        weights = sum(v for k, v in own.items() if k.startswith(("codes", "values", "data")))
        rows[name] = {
            "numel": int(meta["numel"]),
            "kept_percent": round(100.0 * int(meta["nonzero"]) / int(meta["numel"]), 2),
            "encoding": meta["encoding"]
            + (f":{meta_label(meta)}" if meta["encoding"] == "coded" else ""),
            "weight_bits": round(8 * weights / kept, 2),
            "index_bits": round(8 * index / kept, 2),
            "side_bytes": sum(own.values()) - weights - index,
            "bytes": int(meta["bytes"]),
            "rate": round(int(meta["numel"]) * 4 / max(int(meta["bytes"]), 1), 1),
            "codes_entropy_bits": meta.get("codes_entropy_bits"),
            "codes_payload_bits": meta.get("codes_payload_bits"),
            "gaps_entropy_bits": meta.get("gaps_entropy_bits"),
            "gaps_payload_bits": meta.get("gaps_payload_bits"),
        }
    return rows


def _save_and_check(
    model: nn.Module, path: Path, entropy: str, data: str, ctx: Context
) -> dict[str, Any]:
    st.save(model, path, entropy=entropy)
    with harness.stopwatch() as load_s:
        loaded = st.load(path)
    x = torch.randn(64, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        exact = torch.equal(loaded(x), model.eval()(x))
    acc = evaluate_accuracy(loaded, ctx, data).value
    return {
        "bytes": st.api.artifact_size(path),
        "accuracy": acc,
        "load_seconds": round(load_s.seconds, 3),
        "outputs_exact": exact,
        "layers": _layer_rows(path),
    }


def _baselines(pq: Path, pqh: Path) -> dict[str, int]:
    """Generic coders over the P+Q tensor file, against our Huffman-coded tensor file (both
    without the JSON manifest, which the generic coders do not see either)."""
    raw = (pq / MODEL_FILE).read_bytes()
    ours = (pqh / MODEL_FILE).read_bytes()
    return {
        "pq_safetensors": len(raw),
        "zstd19": len(zstandard.ZstdCompressor(level=19).compress(raw)),
        "lzma9e": len(lzma.compress(raw, preset=9 | lzma.PRESET_EXTREME)),
        "pqh_safetensors": len(ours),
        "zstd19_over_pqh": len(zstandard.ZstdCompressor(level=19).compress(ours)),
        "manifest_bytes": (pqh / "manifest.json").stat().st_size,
    }


def run_case(
    label: str, arch: str, model: nn.Module, data: str, recipe: str, tmp: Path
) -> dict[str, Any]:
    ctx = Context(seed=0, progress=False)
    tmp = tmp / "".join(c if c.isalnum() else "-" for c in label)
    tmp.mkdir()
    dense = dense_safetensors_bytes(model.state_dict())
    base_acc = evaluate_accuracy(model, ctx, data).value
    task = make_task("classification", data)
    head, tail = _split(load_recipe(recipe))
    with harness.stopwatch() as sw:
        pruned = st.compress(model, head, data=task, ctx=ctx).model
        shared = st.compress(copy.deepcopy(pruned), tail, data=task, ctx=ctx).model
    seconds = sw.seconds
    st.api.get_metadata(shared)["recipe"] = load_recipe(recipe).to_dict()
    stages = {
        "P": _save_and_check(pruned, tmp / f"{arch}-p", "none", data, ctx),
        "P+Q": _save_and_check(shared, tmp / f"{arch}-pq", "none", data, ctx),
        "P+Q+H": _save_and_check(shared, tmp / f"{arch}-pqh", "huffman", data, ctx),
    }
    for s in stages.values():
        s["ratio"] = round(dense / s["bytes"], 2)
        s["drop_points"] = round(base_acc - s["accuracy"], 2)
    return {
        "label": label,
        "arch": arch,
        "data": data,
        "recipe": recipe,
        "dense_bytes": dense,
        "baseline_accuracy": base_acc,
        "paper_ratio": PAPER[arch],
        "compress_seconds": round(seconds, 1),
        "stages": stages,
        "generic_over_pq": _baselines(tmp / f"{arch}-pq", tmp / f"{arch}-pqh"),
    }


def mnist5k_model(arch: str) -> nn.Module:
    torch.manual_seed(0)
    model = ARCHITECTURES[arch]()
    images, labels = load_mnist5k("train")
    train_classifier(model, images, labels, TrainSpec(arch=arch, epochs=30, lr=1e-3))
    return model.eval()


def markdown(rows: list[dict[str, Any]]) -> str:
    header = ["Network (data)", "fp32 bytes", "acc fp32", "P: bytes, x, acc",
              "P+Q: bytes, x, acc", "P+Q+H: bytes, x, acc", "drop (pts)", "paper", "load s"]  # fmt: skip
    cells = []
    for r in rows:
        stages = [
            f"{s['bytes']:,} / {s['ratio']}x / {s['accuracy']:.2f}"
            for s in (r["stages"]["P"], r["stages"]["P+Q"], r["stages"]["P+Q+H"])
        ]
        h = r["stages"]["P+Q+H"]
        cells.append(
            [r["label"], f"{r['dense_bytes']:,}", f"{r['baseline_accuracy']:.2f}", *stages,
             f"{h['drop_points']:+.2f}", f"{r['paper_ratio']}x", h["load_seconds"]]
        )  # fmt: skip
    out = [harness.markdown_table(header, cells, "lrrlllrrr"), ""]
    for r in rows:
        out.append(f"**{r['label']}** per layer (bits per kept weight; rate = fp32 bytes / bytes)")
        out.append("")
        header = ["Layer", "weights", "kept %", "weight bits P+Q", "weight bits P+Q+H",
                  "entropy bound", "index bits P+Q", "index bits P+Q+H", "rate P+Q",
                  "rate P+Q+H"]  # fmt: skip
        layers = []
        pq, pqh = r["stages"]["P+Q"]["layers"], r["stages"]["P+Q+H"]["layers"]
        for name, a in pq.items():
            b = pqh[name]
            kept = max(int(a["numel"] * a["kept_percent"] / 100 + 0.5), 1)
            bound = (b["codes_entropy_bits"] or 0) / kept
            layers.append(
                [name, f"{a['numel']:,}", a["kept_percent"], a["weight_bits"], b["weight_bits"],
                 f"{bound:.2f}", a["index_bits"], b["index_bits"], f"{a['rate']}x",
                 f"{b['rate']}x"]
            )  # fmt: skip
        out.append(harness.markdown_table(header, layers, "l" + "r" * 9))
        g = r["generic_over_pq"]
        out.append("")
        out.append(
            f"Tensor file only (no manifest): P+Q {g['pq_safetensors']:,} B; generic coders"
            f" over it: zstd -19 {g['zstd19']:,} B, xz -9e {g['lzma9e']:,} B; our Huffman"
            f" coding (P+Q+H) {g['pqh_safetensors']:,} B (zstd -19 over that:"
            f" {g['zstd19_over_pqh']:,} B). Manifest: {g['manifest_bytes']:,} B."
        )
        out.append("")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", choices=["fashion", "mnist5k"])
    parser.add_argument("--recipe", default="deep-compression")
    parser.add_argument("--out", type=Path, default=harness.result_path("deep_compression.json"))
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory(prefix="slimtorch-dc-") as tmp:
        if args.only in (None, "fashion"):
            for arch, name in (("lenet300", "lenet300-fashion"), ("lenet5", "lenet5-fashion")):
                model = load_model(f"builtin:{name}").model
                label = f"{'LeNet-300-100' if arch == 'lenet300' else 'LeNet-5'} (Fashion-MNIST)"
                rows.append(
                    run_case(label, arch, model, "builtin:fashion-mnist", args.recipe, Path(tmp))
                )
                print(markdown(rows[-1:]), flush=True)
                if arch == "lenet5" and args.recipe == "deep-compression":
                    label95 = f"{label}, 95% pruned"
                    fashion = "builtin:fashion-mnist"
                    rows.append(run_case(label95, arch, model, fashion, EXTRA_95, Path(tmp)))
                    print(markdown(rows[-1:]), flush=True)
        if args.only in (None, "mnist5k"):
            for arch in ("lenet300", "lenet5"):
                label = f"{'LeNet-300-100' if arch == 'lenet300' else 'LeNet-5'} (MNIST-5k)"
                model = mnist5k_model(arch)
                rows.append(run_case(label, arch, model, "builtin:mnist5k", args.recipe, Path(tmp)))
                print(markdown(rows[-1:]), flush=True)
    env = harness.environment(["zstandard"])
    record = {
        "command": "bench/bench_deep_compression.py"
        + (f" --only {args.only}" if args.only else "")
        + (f" --recipe {args.recipe}" if args.recipe != "deep-compression" else ""),
        "torch": env["torch"],
        "machine": env["machine"],
        "threads": env["threads"],
        "rows": rows,
        "environment": env,
    }
    harness.write_result(args.out, record)
    print(markdown(rows))


if __name__ == "__main__":
    main()
