"""1-D k-means for weight sharing: slimtorch.share.kmeans.kmeans_1d vs scikit-learn's KMeans.

    .venv/bin/python bench/bench_kmeans.py [--only lenet300|lenet5|minilm] [--quick]
                                           [--out bench/results/kmeans.json]

Values are real layer weights (flattened): LeNet-300-100 fc1/fc2/fc3 (k = 32 and 64),
LeNet-5 conv1/conv2 (k = 256) and fc1 (k = 32), each dense and as the non-zero weights left
by 92% global magnitude pruning of the model's Linear/Conv2d weights (the Deep Compression
pipeline clusters what pruning keeps), and MiniLM's encoder.layer.0.intermediate.dense.weight
(589,824 values; k = 16, 64, 256). Everything runs on one thread (OMP_NUM_THREADS=1 is set
before numpy/scikit-learn load, threadpoolctl limits BLAS/OpenMP too, torch.set_num_threads(1)).

* sklearn: ``KMeans(k, init="k-means++", n_init=1, random_state=0)`` on float32 [n, 1] -- this is
  also scikit-learn's default (``n_init="auto"`` means one run for k-means++); and, where n * k
  <= 20M, ``n_init=10`` (the pre-1.4 default, best of 10) as the strong inertia reference.
* ours: ``kmeans_1d(values, k, init)`` for every init, with the default split-merge refinement
  and with ``refine=False`` (plain Lloyd). Defaults otherwise (max_iter 100, tol 1e-7).

Inertia is recomputed the same way for every result (float64, nearest centroid of the float32
codebook). Times are the median of 3 calls (1 call for sklearn fits where n * k > 20M), and
include everything (ours: checks, sort, init, Lloyd, labels; sklearn: fit with labels_).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.cluster import KMeans

import harness
from slimtorch.models.registry import load_model
from slimtorch.share.kmeans import INITS, assign, kmeans_1d

OUT_DEFAULT = harness.result_path("kmeans.json")
BIG = 20_000_000  # n * k above which sklearn is timed once and n_init=10 is skipped
SPARSITY = 0.92


def _weights(spec: str, layers: list[str]) -> dict[str, torch.Tensor]:
    params = dict(load_model(spec).model.named_parameters())
    return {name: params[f"{name}.weight"].detach().flatten().float() for name in layers}


def _pruned(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Non-zero weights after global magnitude pruning of ``SPARSITY`` of all of them."""
    allw = torch.cat(list(weights.values())).abs()
    threshold = torch.kthvalue(allw, int(SPARSITY * allw.numel())).values
    return {name: w[w.abs() > threshold] for name, w in weights.items()}


def cases(only: str | None, quick: bool) -> list[tuple[str, torch.Tensor, int]]:
    out: list[tuple[str, torch.Tensor, int]] = []
    if only in (None, "lenet300"):
        w = _weights("builtin:lenet300-fashion", ["fc1", "fc2", "fc3"])
        for tag, ws in (("", w), (" nz92", _pruned(w))):
            for k in (32,) if quick else (32, 64):
                out += [(f"lenet300 {n}{tag}", v, k) for n, v in ws.items()]
    if only in (None, "lenet5"):
        w = _weights("builtin:lenet5-fashion", ["conv1", "conv2", "fc1", "fc2"])
        for tag, ws in (("", w), (" nz92", _pruned(w))):
            out += [(f"lenet5 {n}{tag}", ws[n], 256) for n in ("conv1", "conv2")]
            out += [(f"lenet5 fc1{tag}", ws["fc1"], 32)]
    if only in (None, "minilm"):
        name = "encoder.layer.0.intermediate.dense"
        v = _weights("builtin:minilm", [name])[name]
        out += [(f"minilm {name}", v, k) for k in ((16,) if quick else (16, 64, 256))]
    return out


def inertia(x: torch.Tensor, centroids: torch.Tensor) -> float:
    c = torch.sort(centroids.flatten().float()).values
    return float(((x.double() - c.double()[assign(x, c)]) ** 2).sum())


def timed(fn: Callable[[], Any], repeats: int) -> tuple[Any, float]:
    """The last call's result and the median seconds of ``repeats`` calls."""
    out, timing = harness.timed(fn, repeats)
    return out, timing.median / 1000.0


def measure(label: str, x: torch.Tensor, k: int) -> dict[str, Any]:
    xn = x.numpy().reshape(-1, 1)
    big = x.numel() * k > BIG
    fit1, t1 = timed(lambda: KMeans(k, n_init=1, random_state=0).fit(xn), 1 if big else 3)
    ref = inertia(x, torch.from_numpy(fit1.cluster_centers_))
    row: dict[str, Any] = {"case": label, "n": x.numel(), "k": k,
                           "sklearn": {"inertia": ref, "seconds": t1, "n_iter": int(fit1.n_iter_)}}  # fmt: skip
    if not big:
        fit10, t10 = timed(lambda: KMeans(k, n_init=10, random_state=0).fit(xn), 1)
        row["sklearn_n_init10"] = {"inertia": inertia(x, torch.from_numpy(fit10.cluster_centers_)),
                                   "seconds": t10}  # fmt: skip
    for init in INITS:
        for refine in (True, False):
            r, t = timed(lambda i=init, f=refine: kmeans_1d(x, k, init=i, refine=f), 3)
            row[f"{init}{'' if refine else ' lloyd'}"] = {
                "inertia": inertia(x, r.centroids), "seconds": t, "iterations": r.iterations,
                "inertia_ratio": inertia(x, r.centroids) / ref, "speedup": t1 / t}  # fmt: skip
    return row


def table(rows: list[dict[str, Any]]) -> str:
    keys = [f"{i}{s}" for i in INITS for s in ("", " lloyd")]
    header = ["weights", "n", "k", "sklearn s", *keys, "best ours vs n_init=10"]
    lines = []
    for r in rows:
        cells = [f"{r[key]['inertia_ratio']:.3f} / {r[key]['speedup']:.0f}x" for key in keys]
        best = min(r[key]["inertia"] for key in INITS)
        ten = r.get("sklearn_n_init10")
        vs10 = f"{best / ten['inertia']:.3f}" if ten else "n/a"
        lines.append([r["case"], f"{r['n']:,}", r["k"], f"{r['sklearn']['seconds']:.3f}",
                      *cells, vs10])  # fmt: skip
    return harness.markdown_table(header, lines)


PEERS = ("scikit-learn", "threadpoolctl")


def versions() -> dict[str, str]:
    names = ("slimtorch", *PEERS)
    return {"torch": str(torch.__version__), "numpy": np.__version__, **harness.versions(names)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["lenet300", "lenet5", "minilm"], default=None)
    parser.add_argument("--quick", action="store_true", help="fewer k values")
    parser.add_argument("--out", type=Path, default=OUT_DEFAULT)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(1)
    except ImportError:
        pass
    rows = []
    for label, x, k in cases(args.only, args.quick):
        rows.append(measure(label, x, k))
        print(table(rows[-1:]).splitlines()[-1], flush=True)
    print("\ncells: inertia ours / sklearn (n_init=1, k-means++), speed-up vs sklearn\n")
    print(table(rows))
    env = harness.environment(PEERS)
    meta = {"command": "python bench/bench_kmeans.py", "argv": sys.argv[1:] if argv is None else argv,
            "threads": 1, "versions": versions(), "machine": env["platform"],
            "processor": env["machine"], "cpus": env["cpus"], "sparsity": SPARSITY}  # fmt: skip
    harness.write_result(args.out, {"meta": meta, "results": rows, "environment": env})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
