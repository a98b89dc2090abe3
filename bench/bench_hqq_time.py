"""HQQ quantization time: slimtorch's ``quantize.hqq`` against the hqq package and RTN, per layer.

    .venv-bench/bin/python bench/bench_hqq_time.py [--bits 4 3] [--threads 1] [--quick]

The weights are builtin:smollm2-135m's 210 Linear layers of its 30 decoder blocks (7 each), as
slimtorch's model registry loads them (bench_llm_real.py's base). For every bit width and every
weight, in one process, three quantizers run one after the other, the order rotating from one
weight to the next so that load drifts on a shared machine hit all three alike:

* ``slimtorch-hqq``: :func:`slimtorch.quantize.hqq.hqq_quantize` with the stage's defaults
  (``quantize.hqq``: asymmetric, groups of 64 inputs, 20 steps, lp 0.7, beta 10, kappa 1.01,
  fractional zero points; fp16 scales and zeros, codes as uint8);
* ``hqq-package``: the hqq package's ``Quantizer.quantize(w, nbits, group_size=64,
  optimize=True, axis=1, compute_dtype=float32, device="cpu")``, its default optimizer
  (``optimize_weights_proximal``, the same defaults) and its default bit packing, as
  bench_llm_real.py's hqq rows run it;
* ``slimtorch-rtn``: :func:`slimtorch.quantize.affine.quantize_weight`, asymmetric unsigned
  min-max, groups of 64 (``quantize.rtn`` with ``symmetric: false, signed: false,
  granularity: per_group, group_size: 64``).

Only the quantizer call is timed (``time.perf_counter``); each method is warmed up once on the
first weight before. Per method and bit width: total, fastest and median seconds per weight,
and the mean over the weights of the relative weight error ``||W - Q(W)||_F / ||W||_F``. The
package's error is taken as bench_llm_real.py ships it (scales and zeros cast to fp16, then
dequantized by the package); ours from the artifact's state. ``ours_vs_package`` is the
relative difference of the two HQQ mean errors (recorded: about 0.01%).

``--quick``: the 7 weights of the first block. Results: bench/results/hqq_time.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import harness

MODEL = "builtin:smollm2-135m"
GROUP = 64
METHODS = ("slimtorch-hqq", "hqq-package", "slimtorch-rtn")
RESULTS = harness.result_path("hqq_time.json")
AGREE = 1e-3  # ours vs the package: mean relative errors within 0.1% of each other


def linear_weights(limit: int | None) -> list[tuple[str, Any]]:
    """``(name, float32 weight)`` of the Linear layers inside SmolLM2's decoder blocks."""
    import torch

    from slimtorch.models.registry import load_model

    model = load_model(MODEL).model
    found = [
        (f"{name}.weight", module.weight.detach().to(torch.float32).clone())
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and ".layers." in f".{name}"
    ]
    return found[:limit] if limit else found


def ours(w: Any, bits: int) -> tuple[Callable[[], Any], Callable[[Any], Any]]:
    """Our HQQ: the call to time, and how to dequantize its result."""
    from slimtorch.formats.state import dequantize
    from slimtorch.quantize.hqq import HQQParams, hqq_quantize

    return (
        lambda: hqq_quantize(w, bits, GROUP, HQQParams()),
        lambda q: dequantize(q, w.shape),
    )


def package(w: Any, bits: int) -> tuple[Callable[[], Any], Callable[[Any], Any]]:
    """The hqq package's quantizer, as bench_llm_real.py runs it."""
    import torch
    from hqq.core.quantize import Quantizer as HQQ  # type: ignore[import-not-found]

    def run() -> Any:
        return HQQ.quantize(w, nbits=bits, group_size=GROUP, optimize=True, axis=1,
                            compute_dtype=torch.float32, device="cpu")  # fmt: skip

    def values(result: Any) -> Any:
        wq, meta = result
        meta = {**meta, "scale": meta["scale"].half().float(), "zero": meta["zero"].half().float()}
        return HQQ.dequantize(wq, meta).reshape(w.shape)

    return run, values


def rtn(w: Any, bits: int) -> tuple[Callable[[], Any], Callable[[Any], Any]]:
    """Our round-to-nearest on the same asymmetric g64 grid (min-max)."""
    from slimtorch.formats.state import dequantize
    from slimtorch.quantize.affine import quantize_weight
    from slimtorch.quantize.primitives import QuantSpec

    spec = QuantSpec(bits=bits, signed=False, symmetric=False, granularity="per_group",
                     group_size=GROUP)  # fmt: skip
    return lambda: quantize_weight(w, spec), lambda q: dequantize(q, w.shape)


BUILDERS = {"slimtorch-hqq": ours, "hqq-package": package, "slimtorch-rtn": rtn}


def relative_error(w: Any, values: Any) -> float:
    return float((w - values.to(w.dtype)).norm() / w.norm())


def measure(weights: list[tuple[str, Any]], bits: int) -> dict[str, Any]:
    """Every method on every weight, the order rotating per weight; per-weight seconds and
    relative errors, and their summary."""
    import torch

    first = weights[0][1]
    for name in METHODS:  # warm-up: first-call allocations and lazy imports, untimed
        BUILDERS[name](first, bits)[0]()
    seconds: dict[str, list[float]] = {m: [] for m in METHODS}
    errors: dict[str, list[float]] = {m: [] for m in METHODS}
    for i, (wname, w) in enumerate(weights):
        order = METHODS[i % 3 :] + METHODS[: i % 3]
        for name in order:
            call, values = BUILDERS[name](w, bits)
            with torch.no_grad():
                start = time.perf_counter()
                result = call()
                seconds[name].append(time.perf_counter() - start)
                errors[name].append(relative_error(w, values(result)))
        print(
            f"w{bits} {i + 1}/{len(weights)} {wname} {tuple(w.shape)}: "
            + ", ".join(f"{m} {seconds[m][-1]:.2f} s" for m in METHODS),
            flush=True,
        )
    methods = {
        m: {
            "total_s": round(sum(seconds[m]), 2),
            "min_s": round(min(seconds[m]), 4),
            "median_s": round(statistics.median(seconds[m]), 4),
            "mean_relative_error": statistics.fmean(errors[m]),
        }
        for m in METHODS
    }
    a, b = (methods[m]["mean_relative_error"] for m in ("slimtorch-hqq", "hqq-package"))
    gap = (a - b) / b
    return {
        "bits": bits,
        "weights": len(weights),
        "methods": methods,
        "ours_vs_package_error": gap,
        "errors_agree": abs(gap) < AGREE,
        "per_weight_columns": ["name", "shape", "seconds per method", "error per method"],
        "per_weight": [  # one line each: seconds and relative errors in METHODS' order
            [
                n,
                list(w.shape),
                [round(seconds[m][i], 4) for m in METHODS],
                [float(f"{errors[m][i]:.7g}") for m in METHODS],
            ]
            for i, (n, w) in enumerate(weights)
        ],
    }


def table(runs: list[dict[str, Any]]) -> str:
    rows = []
    for run in runs:
        for m, r in run["methods"].items():
            rows.append([f"w{run['bits']} g{GROUP}", m, f"{r['total_s']:.1f}", f"{r['min_s']:.3f}",
                         f"{r['median_s']:.3f}", f"{r['mean_relative_error']:.5f}"])  # fmt: skip
    return harness.markdown_table(
        ["grid", "method", "total s", "min s/weight", "median s/weight", "mean rel. error"],
        rows,
        "llrrrr",
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--bits", type=int, nargs="+", default=[4, 3], choices=[1, 2, 3, 4, 5, 6, 8]
    )
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--quick", action="store_true", help="the 7 weights of block 0 only")
    args = parser.parse_args(argv)
    import torch

    try:
        import hqq  # type: ignore[import-not-found]  # noqa: F401
    except ImportError:
        print("needs the hqq package: .venv-bench (make bench-env; hqq==0.2.8)", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    weights = linear_weights(7 if args.quick else None)
    runs = [measure(weights, bits) for bits in args.bits]
    print(table(runs))
    for run in runs:
        gap = run["ours_vs_package_error"]
        print(f"w{run['bits']}: ours vs the package, mean relative error {100 * gap:+.4f}%")
    record = {
        "model": MODEL,
        "group_size": GROUP,
        "methods": list(METHODS),
        "quick": args.quick,
        "runs": runs,
    }
    harness.save_result(RESULTS, record, packages=("hqq",))
    print(f"wrote {RESULTS}")
    return 0 if all(r["errors_agree"] for r in runs) else 1


if __name__ == "__main__":
    raise SystemExit(main())
