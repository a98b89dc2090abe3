"""``slimtorch split``: cut a model between a device and a server where the end-to-end latency
is lowest, and write both parts as ONNX files checked in onnxruntime.

    slimtorch split --model builtin:resnet18-fashion --profile phone --server-profile server \\
        --bandwidth 20Mbps --out split/
    slimtorch split --model builtin:minilm --bandwidth 1Mbps --cut-int8 --recipe int8 --out s/

OUT holds ``device.onnx``, ``server.onnx`` (no file for a side that runs nothing) and
``plan.json``: every valid cut with its predicted latency, the chosen one, the latency measured
here and the check of device -> server against the whole model.
"""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Add the ``split`` subcommand to the ``sub`` subparsers of the main parser."""
    p: argparse.ArgumentParser = sub.add_parser(
        "split",
        help="split a model between a device and a server at the cut with the lowest latency",
    )
    p.add_argument("--model", required=True, help="builtin:NAME, a HF directory, pkg.mod:factory")
    p.add_argument("--out", required=True, help="directory for device.onnx, server.onnx, plan.json")
    p.add_argument("--profile", default="phone", help="the device: mcu, phone, server or a YAML")
    p.add_argument("--server-profile", default="server", help="the server: a profile or a YAML")
    p.add_argument("--bandwidth", default="20Mbps", help="link: 20Mbps, 1Gbps, 500kbps, 2MB/s")
    p.add_argument("--rtt", type=float, default=0.0, help="round trip added per request (ms)")
    p.add_argument(
        "--cut-int8",
        action="store_true",
        help="send float tensors at the cut as uint8 codes with a scale and offset per row",
    )
    p.add_argument("--recipe", help="compress the device part with this recipe (preset or YAML)")
    p.add_argument("--batch", type=int, default=1, help="requests per run (default 1)")
    p.add_argument("--cut", type=int, help="use this cut (its index in plan.json), not the best")
    p.add_argument("--max-tensors", type=int, default=2, help="most tensors allowed to cross a cut")
    p.add_argument(
        "--timing",
        choices=("onnx", "torch"),
        default="onnx",
        help="time the segments between cuts in onnxruntime (default) or PyTorch",
    )
    p.add_argument("--force", action="store_true", help="replace an earlier split in --out")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    return p


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run ``slimtorch split``; returns plan.json's content plus ``out``."""
    from slimtorch.workflows.split import SplitOptions, split

    options = SplitOptions(
        profile=args.profile,
        server_profile=args.server_profile,
        bandwidth=args.bandwidth,
        rtt_ms=args.rtt,
        cut_int8=args.cut_int8,
        recipe=args.recipe,
        batch=args.batch,
        cut=args.cut,
        max_tensors=args.max_tensors,
        timing=args.timing,
        force=args.force,
    )
    return split(args.model, args.out, options)


def render(result: dict[str, Any]) -> str:
    """Plain-text summary of :func:`run`'s result."""
    cut = result["cuts"][result["chosen"]]
    pred, meas = result["predicted_ms"], result["measured_ms"]
    device, server = result["profiles"]["device"], result["profiles"]["server"]
    link = result["link"]["bandwidth_bps"] / 1e6
    check = result["check"]
    lines = [
        f"cut {cut['index']}: {cut['name']} ({cut['bytes']:,} bytes per request"
        f"{', int8' if result['cut_int8'] else ''}) over {link:g} Mbps;"
        f" device {device['name']} (speed {device['speed']:g}), server {server['name']}"
        f" (speed {server['speed']:g})",
        f"predicted {pred['total_ms']:.2f} ms = device {pred['device_ms']:.2f} + transfer"
        f" {pred['transfer_ms']:.2f} + server {pred['server_ms']:.2f}",
        f"measured  {meas['total_ms']:.2f} ms = device {meas['device_ms']:.2f} + transfer"
        f" {meas['transfer_ms']:.2f} + server {meas['server_ms']:.2f} (parts run here in"
        " onnxruntime, scaled by each profile's speed; transfer = bytes / bandwidth)",
        f"device -> server in onnxruntime vs the same parts in PyTorch: max |diff|"
        f" {check['max_abs_diff']:.3g} ({'within' if check['within_tolerance'] else 'outside'}"
        f" {check['atol']} + {check['rtol']} x |value|), cosine {check['cosine_first_output']:.6f}",
        f"wrote {result['out']}: {', '.join(f['file'] for f in result['files'].values())},"
        " plan.json",
    ]
    whole = result["check_vs_whole_model"]
    if result["recipe"] or result["cut_int8"]:
        lines.append(
            f"vs the whole uncompressed model: max |diff| {whole['max_abs_diff']:.3g}"
            f" ({whole['max_abs_diff_over_peak']:.3%} of its peak), cosine"
            f" {whole['cosine_first_output']:.6f}"
        )
    budget = result.get("device_budget")
    if budget:
        lines.append(
            f"device part {budget['bytes']:,} bytes: {'within' if budget['fits'] else 'OVER'}"
            f" the device profile's max_size {budget['max_size']} ({budget['max_bytes']:,} bytes)"
        )
    return "\n".join(lines)
