"""Benchmark of ``slimtorch split``: the chosen cut at several bandwidths, predicted vs measured.

    python bench/bench_split.py                          # -> bench/results/split.json
    python bench/bench_split.py --models lenet5-fashion --bandwidths 1Mbps,1Gbps   # quick

For each model and link bandwidth (dense, and with ``--cut-int8``), ``slimtorch.workflows.split``
chooses the cut for a phone device (profile ``phone``, speed 0.5) and a server (``server``,
speed 8.0) - speeds relative to one thread of this machine, a model of those devices, not a
measurement of them. Every time is the CPU time of the one thread that runs it, fastest of
repeated runs (the cores here are shared: wall time of long runs is inflated by preemption).
"Predicted" sums per-segment onnxruntime latencies measured here, divided
by each side's speed, plus bytes / bandwidth. "Measured" runs the two exported ONNX parts here
in onnxruntime (one thread), divided by the same speeds, plus the bytes the device part really
returned / bandwidth: transfer is computed, not sent over a network. Then a few interior cuts
are forced (``--cut``) to test the latency model where it does not choose to cut.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path
from typing import Any

import harness

RESULTS = harness.result_path("split.json")
# interior cuts forced to check the prediction there: keys (module before | module after)
FORCED = {
    "resnet18-fashion": ("layer2.1.relu|layer3.0", "layer3.1.relu|layer4.0"),
    "minilm": ("encoder.layer.1.output.LayerNorm|", "encoder.layer.3.output.LayerNorm|"),
    "lenet5-fashion": ("fc1|",),
}


def _row(model: str, doc: dict[str, Any], forced: bool, int8: bool) -> dict[str, Any]:
    cut = doc["cuts"][doc["chosen"]]
    pred, meas = doc["predicted_ms"], doc["measured_ms"]
    return {
        "model": model,
        "bandwidth_mbps": doc["link"]["bandwidth_bps"] / 1e6,
        "int8": doc["cut_int8"],  # the codec ran (nothing crosses when all is on the device)
        "int8_requested": int8,
        "forced": forced,
        "cut": doc["chosen"],
        "cut_name": cut["name"],
        "bytes": cut["bytes"],
        "sent_bytes": doc["sent_bytes"] if doc["chosen"] < len(doc["cuts"]) - 1 else 0,
        "predicted_ms": {k: pred[k] for k in ("device_ms", "transfer_ms", "server_ms", "total_ms")},
        "measured_ms": {k: meas[k] for k in ("device_ms", "transfer_ms", "server_ms", "total_ms")},
        "check": doc["check"],
        "check_vs_whole_model": doc["check_vs_whole_model"],
        "recipe": doc["recipe"],
        "device_file_bytes": (doc["files"].get("device") or {}).get("bytes"),
        "server_file_bytes": (doc["files"].get("server") or {}).get("bytes"),
        "segments_timed_in": sorted(set(doc["segments_timed_in"])),
    }


def _find(doc: dict[str, Any], key: str) -> int:
    names = [c["name"] for c in doc["cuts"]]
    before, _, after = key.partition("|")
    for i, name in enumerate(names):
        if name.startswith(f"after {before} (") and f"before {after}" in name:
            return i
    raise SystemExit(f"no cut after {before} / before {after} in {names}")


def run(models: list[str], bandwidths: list[str], work: Path) -> list[dict[str, Any]]:
    from slimtorch.workflows.split import SplitOptions, split

    rows = []
    for model in models:
        first = None
        for int8 in (False, True):
            for bw in bandwidths:
                out = work / f"{model}-{bw}-{int(int8)}"
                opts = SplitOptions(bandwidth=bw, cut_int8=int8, force=True)
                doc = split(f"builtin:{model}", out, opts)
                first = first or doc
                rows.append(_row(model, doc, False, int8))
                print(_line(rows[-1]), flush=True)
        assert first is not None
        for key in FORCED.get(model, ()):
            for int8 in (False, True):
                cut = _find(first, key)
                opts = SplitOptions(bandwidth="20Mbps", cut_int8=int8, cut=cut, force=True)
                doc = split(f"builtin:{model}", work / f"{model}-forced-{cut}-{int(int8)}", opts)
                rows.append(_row(model, doc, True, opts.cut_int8))
                print(_line(rows[-1]), flush=True)
        key = FORCED.get(model, ())[-1:]
        for k in key:  # the device part compressed by a recipe (int8 weights), int8 link
            cut = _find(first, k)
            opts = SplitOptions(
                bandwidth="20Mbps", cut_int8=True, cut=cut, recipe="int8", force=True
            )
            doc = split(f"builtin:{model}", work / f"{model}-recipe-{cut}", opts)
            rows.append(_row(model, doc, True, opts.cut_int8))
            print(_line(rows[-1]), flush=True)
    return rows


def _line(r: dict[str, Any]) -> str:
    p, m = r["predicted_ms"], r["measured_ms"]
    return (
        f"{r['model']} {r['bandwidth_mbps']:g} Mbps int8={r['int8']} cut {r['cut']}"
        f" ({r['cut_name']}): predicted {p['total_ms']:.2f} measured {m['total_ms']:.2f} ms"
    )


def _int8_cell(r: dict[str, Any]) -> str:
    if r["int8"]:
        return "yes"
    return "asked; no float crosses" if r.get("int8_requested") else "no"


def table(rows: list[dict[str, Any]]) -> str:
    header = ["model", "link", "int8 link", "cut", "bytes sent", "predicted ms (dev+net+srv)",
              "measured ms (dev+net+srv)", "error vs whole model", "device file"]  # fmt: skip
    cells = []
    for r in rows:
        p, m, c = r["predicted_ms"], r["measured_ms"], r["check_vs_whole_model"]
        fmt = lambda d: (  # noqa: E731
            f"{d['total_ms']:.2f} ({d['device_ms']:.2f}+{d['transfer_ms']:.2f}+{d['server_ms']:.2f})"
        )
        err = f"{c['max_abs_diff']:.2g}"
        if r["int8"] or r["recipe"]:
            err += (
                f" ({c['max_abs_diff_over_peak']:.2%} of peak, cos {c['cosine_first_output']:.5f})"
            )
        dev = f"{r['device_file_bytes']:,}" if r["device_file_bytes"] else "-"
        if r["recipe"]:
            dev += f" (recipe {r['recipe']})"
        cut = ("forced " if r["forced"] else "") + f"{r['cut']}: {r['cut_name'].split(' / ')[0]}"
        cells.append([r["model"], f"{r['bandwidth_mbps']:g} Mbps", _int8_cell(r),
                      cut, f"{r['sent_bytes']:,}", fmt(p), fmt(m), err, dev])  # fmt: skip
    return harness.markdown_table(header, cells, "llllrrrrr")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="resnet18-fashion,minilm")
    p.add_argument("--bandwidths", default="1Mbps,10Mbps,100Mbps,1Gbps")
    p.add_argument("--work", help="where the split directories go (default: a temp dir)")
    p.add_argument("--table", action="store_true", help="print the table of the results file")
    args = p.parse_args()
    if args.table:
        print(table(harness.read_result(RESULTS, {"rows": []})["rows"]))
        return
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    work = Path(args.work or tempfile.mkdtemp(prefix="split-bench-"))
    rows: list[dict[str, Any]] = []
    for model in args.models.split(","):  # the file is written after each model
        rows = _save(run([model], args.bandwidths.split(","), work), model)
    print(table(rows))


def _save(new: list[dict[str, Any]], model: str) -> list[dict[str, Any]]:
    kept = harness.read_result(RESULTS, {"rows": []})["rows"]  # other models' rows stay
    rows = [r for r in kept if r["model"] != model] + new
    record = {
        "what": "slimtorch split: chosen cut per bandwidth; predicted vs measured latency",
        "profiles": {"device": "phone (speed 0.5)", "server": "server (speed 8.0)"},
        "how": "predicted: per-segment onnxruntime ms here / speed + bytes/bandwidth; measured:"
        " the two ONNX parts run here in onnxruntime (1 thread) / speed + bytes really returned"
        " by the device part / bandwidth (computed, no network); times: CPU time of the"
        " running thread, fastest of repeated runs",
        "rows": rows,
    }
    harness.save_result(RESULTS, record, packages=("onnxruntime", "onnx"))
    return rows


if __name__ == "__main__":
    main()
