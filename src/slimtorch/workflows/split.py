"""Split a model between a device and a server (``slimtorch split``).

    slimtorch split --model builtin:resnet18-fashion --profile phone --server-profile server \\
        --bandwidth 20Mbps [--cut-int8] [--recipe int8] --out split/

1. Trace the model into one graph and list its valid cuts (:mod:`slimtorch.search.split_graph`).
2. Time every segment between consecutive cuts here (onnxruntime, or PyTorch with
   ``--timing torch``; one thread); with ``--recipe``
   the device's segments are timed on the compressed model (the recipe compresses the device
   part: the copy it is applied to gives only its device half).
3. Predict each cut's end-to-end latency (:mod:`slimtorch.search.split_cost`): device time /
   device speed + RTT + bytes crossing / bandwidth + server time / server speed, the speeds from
   the profiles (a model of each device class, not a measurement), and choose the lowest.
4. Export both parts to ONNX and check them: device -> (int8 codec) -> server in onnxruntime
   against the whole model; the parts' onnxruntime times measured here give the "measured"
   latency, with the transfer time computed from the bytes the device part really returns.
5. Write OUT atomically: ``device.onnx``, ``server.onnx`` (the side that runs nothing has no
   file) and ``plan.json`` (every cut's prediction, the chosen one, measurements, the check).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimtorch.core.errors import ArtifactError, ConfigError, UnsupportedModelError
from slimtorch.formats.atomic import fsync_tree, temp_sibling
from slimtorch.search.profiles import load_profile
from slimtorch.search.split_cost import (
    CutCost,
    Link,
    best_cut,
    cut_costs,
    int8_bytes,
    parse_bandwidth,
)

PLAN = "plan.json"


@dataclass
class SplitOptions:
    """What ``slimtorch split`` is asked (the flags)."""

    profile: str = "phone"  # the device: a shipped profile or a YAML file (its ``speed``)
    server_profile: str = "server"
    bandwidth: str | float = "20Mbps"
    rtt_ms: float = 0.0  # a fixed round trip added to every cut that uses the server
    cut_int8: bool = False  # send float tensors at the cut as uint8 codes + per-row scale
    recipe: str | None = None  # compresses the device part (preset, YAML file)
    batch: int = 1  # requests per run
    cut: int | None = None  # force this cut (its ``index`` in plan.json) instead of the best
    max_tensors: int = 2  # at most this many tensors may cross a cut
    timing: str = "onnx"  # where segments are timed: onnx (onnxruntime, as the parts run) or torch
    force: bool = False  # replace OUT (a directory an earlier split wrote)


def _check_out(out: Path, force: bool) -> None:
    if not os.path.lexists(out):
        return
    if not out.is_dir():
        raise ArtifactError(f"--out {out} exists and is not a directory; choose another path")
    if any(out.iterdir()) and not force:
        raise ArtifactError(f"output directory {out} exists; pass --force to replace it")
    if any(out.iterdir()) and not (out / PLAN).is_file():
        raise ArtifactError(
            f"output directory {out} is not an earlier split (no {PLAN}); refusing to replace"
            " it even with --force: choose another directory"
        )


def _publish(tmp: Path, out: Path) -> None:
    fsync_tree(tmp)
    old = None
    if os.path.lexists(out):
        old = temp_sibling(out)
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _inputs(model: str | nn.Module, batch: int) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    from slimtorch.calibrate.inputs import example_inputs
    from slimtorch.models.registry import load_model

    if isinstance(model, str):
        loaded = load_model(model)
        net = loaded.model.eval()
        found = loaded.example_inputs(batch) if loaded.example_inputs else None
        found = found or example_inputs(net, batch, loaded.architecture)
    else:
        net, found = model.eval(), example_inputs(model, batch)
    if not found or not all(isinstance(t, torch.Tensor) for t in found):
        raise UnsupportedModelError(
            f"no example inputs for {type(net).__name__}: record them with"
            " slimtorch.core.info.update_info(model, input={'shape': [...], 'dtype': ...})"
        )
    return net, tuple(found)


def _wire_bytes(cut: Any, batch: int, int8: bool) -> int:
    if not int8:
        return int(cut.nbytes) * batch
    total = 0
    for shape, dtype in zip(cut.shapes, cut.dtypes, strict=True):
        sized = [batch if s < 0 else s for s in shape]
        item = torch.empty((), dtype=getattr(torch, dtype)).element_size()
        floating = dtype.startswith(("float", "bfloat")) and len(sized) >= 2
        total += int8_bytes(sized, item, floating)
    return total


def _device_segments(
    compressed: nn.Module, inputs: tuple[torch.Tensor, ...], cuts: list[Any], opts: SplitOptions
) -> tuple[Any, list[int], list[float]]:
    """The compressed model's trace, its index for each cut (matched by the modules on both
    sides of it), and its segment times."""
    from slimtorch.search.split_graph import enumerate_cuts, trace
    from slimtorch.search.split_measure import segment_ms

    traced = trace(compressed, inputs)
    found = {c.key: c.index for c in enumerate_cuts(traced, opts.max_tensors)}
    missing = [c.name for c in cuts if c.key not in found]
    if missing:
        raise UnsupportedModelError(
            f"the recipe {opts.recipe!r} changed the model's graph at {len(missing)} cuts"
            f" ({missing[0]}, ...); use a recipe that keeps the layers' order (quantization,"
            " pruning masks), or compress the model first and split the result"
        )
    indices = [found[c.key] for c in cuts]
    return traced, indices, segment_ms(traced, indices, inputs, opts.timing)[0]


def _table(cuts: list[Any], costs: list[CutCost], wire: list[int]) -> list[dict[str, Any]]:
    return [
        {
            "index": i,
            "name": c.name,
            "crossing": c.crossing,
            "shapes": c.shapes,
            "dtypes": c.dtypes,
            "bytes": wire[i],
            "predicted_ms": {**asdict(k), "total_ms": k.total_ms},
        }
        for i, (c, k) in enumerate(zip(cuts, costs, strict=True))
    ]


@dataclass
class Planned:
    """The analysis behind a split: the traces, the cuts and every cut's predicted cost."""

    traced: Any
    cuts: list[Any]
    device: tuple[Any, list[int], list[float]]  # (trace, cut indices, segment ms) device side
    server: tuple[list[float], list[str]]  # (segment ms, where each was timed)
    costs: list[CutCost]
    wire: list[int]
    profiles: dict[str, dict[str, Any]]
    link: Link
    compressed: nn.Module | None = None  # the model --recipe made (its device half is used)


def plan(net: nn.Module, inputs: tuple[torch.Tensor, ...], opts: SplitOptions) -> Planned:
    """Trace ``net``, list its cuts, time its segments and predict every cut's latency."""
    from slimtorch.search.split_graph import enumerate_cuts, trace
    from slimtorch.search.split_measure import segment_ms

    device_name, device = load_profile(opts.profile)
    server_name, server = load_profile(opts.server_profile)
    link = Link(parse_bandwidth(opts.bandwidth), opts.rtt_ms)
    traced = trace(net, inputs)
    cuts = enumerate_cuts(traced, opts.max_tensors)
    if len(cuts) <= 2:
        raise UnsupportedModelError(
            f"{type(net).__name__} has no point inside it where at most {opts.max_tensors}"
            " tensors (one of them floating point) cross; nothing to split: run it whole on"
            " one side, or raise --max-tensors"
        )
    indices = [c.index for c in cuts]
    server_seg, timed_in = segment_ms(traced, indices, inputs, opts.timing)
    dev: tuple[Any, list[int], list[float]] = (traced, indices, server_seg)
    compressed = None
    if opts.recipe:
        from slimtorch import api

        compressed = api.compress(net, opts.recipe).model.eval()
        dev = _device_segments(compressed, inputs, cuts, opts)
    wire = [_wire_bytes(c, opts.batch, opts.cut_int8) for c in cuts]
    costs = cut_costs((dev[2], server_seg), wire, (device.speed, server.speed), link)
    profiles = {
        "device": {"name": device_name, "speed": device.speed},
        "server": {"name": server_name, "speed": server.speed},
    }
    timing = (server_seg, timed_in)
    return Planned(traced, cuts, dev, timing, costs, wire, profiles, link, compressed)


def _check_options(opts: SplitOptions) -> None:
    load_profile(opts.profile)
    load_profile(opts.server_profile)
    parse_bandwidth(opts.bandwidth)
    if opts.batch < 1 or opts.rtt_ms < 0 or opts.max_tensors < 1:
        raise ConfigError("--batch and --max-tensors must be at least 1 and --rtt at least 0")
    if opts.timing not in ("onnx", "torch"):
        raise ConfigError(f"--timing {opts.timing!r}: use onnx or torch")


def _measured(result: dict[str, Any], planned: Planned, all_device: bool) -> dict[str, Any]:
    link, speeds = planned.link, planned.profiles
    sent = 0 if all_device else result["sent_bytes"]
    dev = result["measured_device_ms_here"] / speeds["device"]["speed"]
    srv = result["measured_server_ms_here"] / speeds["server"]["speed"]
    transfer = 0.0 if all_device else link.rtt_ms + sent * 8.0 / link.bandwidth_bps * 1000.0
    return {
        "device_ms": dev,
        "transfer_ms": transfer,
        "server_ms": srv,
        "total_ms": dev + transfer + srv,
        "how": "both parts run here in onnxruntime (1 thread; CPU time of the fastest of"
        " repeated runs), divided by each profile's speed; transfer computed from the bytes"
        " sent / bandwidth (+ RTT)",
    }


def _budget(net: nn.Module, profile: str, result: dict[str, Any]) -> dict[str, Any] | None:
    """The device part's file against the device profile's ``max_size`` (reported, not enforced:
    ``--recipe`` is how the device part is made to fit)."""
    from slimtorch.search.profiles import parse_size

    limit = load_profile(profile)[1].max_size
    device = result["files"].get("device")
    if limit is None or device is None:
        return None
    dense = sum(p.numel() * p.element_size() for p in net.parameters())
    max_bytes = parse_size(limit, dense)
    return {"max_size": limit, "max_bytes": max_bytes, "bytes": device["bytes"],
            "fits": device["bytes"] <= max_bytes}  # fmt: skip


def split(
    model: str | nn.Module, out: str | Path, options: SplitOptions | None = None
) -> dict[str, Any]:
    """Choose the cut, compress the device part, export and check both parts, write OUT."""
    from slimtorch.search.split_export import Parts, export_and_check
    from slimtorch.search.split_graph import part

    opts = options or SplitOptions()
    out = Path(out)
    _check_options(opts)
    _check_out(out, opts.force)
    net, inputs = _inputs(model, opts.batch)
    planned = plan(net, inputs, opts)
    cuts, costs = planned.cuts, planned.costs
    if opts.cut is not None and not 0 <= opts.cut < len(cuts):
        raise ConfigError(f"--cut {opts.cut}: give an index from 0 to {len(cuts) - 1}")
    chosen = costs[opts.cut] if opts.cut is not None else best_cut(costs)
    k, last = chosen.index, len(cuts) - 1
    traced, (dev_traced, dev_indices, _) = planned.traced, planned.device
    codec = opts.cut_int8 and k < last and any(d.startswith("float") for d in cuts[k].dtypes)
    parts = Parts(
        part(dev_traced, 0, dev_indices[k]) if k > 0 or codec else None,
        part(traced, cuts[k].index, len(traced.compute)) if k < last else None,
        codec,
        planned.compressed,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(out)
    tmp.mkdir()
    try:
        result = export_and_check(net, parts, inputs, tmp)
        doc = {
            "kind": "slimtorch.split",
            "version": 1,
            "model": model if isinstance(model, str) else type(model).__name__,
            "batch": opts.batch,
            "inputs": [list(t.shape) for t in inputs],
            "profiles": planned.profiles,
            "link": {"bandwidth_bps": planned.link.bandwidth_bps, "rtt_ms": opts.rtt_ms},
            "cut_int8": codec,
            "recipe": opts.recipe,
            "traced_dynamic_batch": traced.dynamic,
            "segments_ms_here": {"device": planned.device[2], "server": planned.server[0]},
            "segments_timed_in": planned.server[1],
            "cuts": _table(cuts, costs, planned.wire),
            "chosen": k,
            "forced": opts.cut is not None,
            "predicted_ms": {**asdict(chosen), "total_ms": chosen.total_ms},
            "measured_ms": _measured(result, planned, k == last),
            "device_budget": _budget(net, opts.profile, result),
            **result,
        }
        (tmp / PLAN).write_text(json.dumps(doc, indent=1, default=str))
        _publish(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {**doc, "out": str(out)}
