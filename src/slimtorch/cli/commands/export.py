"""``slimtorch export DIR --to onnx|hf|compressed-tensors|gguf --out OUT``: an artifact for other
runtimes.

    slimtorch export out/ --to onnx --out model.onnx      # verified in onnxruntime
    slimtorch export out/ --to hf --out model-hf/         # transformers' from_pretrained loads it
    slimtorch export out/ --to compressed-tensors --out model-ct/   # packed int4/int8 weights
    slimtorch export out/ --to gguf --out model.gguf      # llama.cpp; checked there if installed

Example inputs come from what the artifact records (builtin models, Hugging Face configs, or
the ``input`` shape recorded with ``slimtorch compress --input-shape``).
"""

from __future__ import annotations

import argparse
from typing import Any

from slimtorch.cli.options import add_trust
from slimtorch.workflows.export import TARGETS  # light: the exporters load when they run


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Add the ``export`` subcommand to the ``sub`` subparsers of the main parser."""
    p: argparse.ArgumentParser = sub.add_parser(
        "export",
        help="export an artifact to ONNX (checked in onnxruntime), a transformers directory or"
        " a GGUF file (llama.cpp)",
    )
    p.add_argument("dir", help="a slimtorch artifact directory (the --out of compress)")
    p.add_argument("--to", required=True, choices=TARGETS, help="the format to write")
    p.add_argument(
        "--out", required=True, help="the .onnx or .gguf file, or the directory to write"
    )
    p.add_argument(
        "--batch",
        type=int,
        default=1,
        help="batch size of the example inputs of builtin and Hugging Face models (an input"
        " shape recorded in the artifact is used as recorded)",
    )
    p.add_argument("--opset", type=int, help="ONNX opset version (default: the exporter's)")
    p.add_argument(
        "--dense",
        action="store_true",
        help="--to onnx: write every weight as dense float (default: compressed weights low-bit)",
    )
    p.add_argument(
        "--strict",
        action="store_true",
        help="--to onnx: fail when a compressed weight cannot be stored low-bit (default: keep"
        " it dense float with a warning)",
    )
    p.add_argument(
        "--decode",
        choices=("load", "run"),
        default="load",
        help="--to onnx: 'load' (default) decodes low-bit weights once when onnxruntime loads"
        " the file (small file, dense float in memory, float speed); 'run' keeps them low-bit"
        " in memory (DequantizeLinear/MatMulNBits, decoded at every run: slower). Both exact",
    )
    p.add_argument(
        "--static",
        action="store_true",
        help="--to onnx: fix every input shape to the example inputs (default: any batch size"
        " and, for Transformers, any sequence length)",
    )
    p.add_argument(
        "--requantize",
        metavar="TYPE",
        help="--to gguf: quantize weights whose grid has no exact GGUF block type again into"
        " TYPE (Q8_0, Q5_1, Q5_0, Q4_1, Q4_0, F16, BF16, F32); default: refuse them, naming"
        " the layer. A k-quant mix (Q4_K_M, Q4_K_S, Q5_K_M, Q5_K_S, or one type for all: Q4_K,"
        " Q5_K, Q6_K) encodes every weight without exact codes as llama.cpp's mix does",
    )
    p.add_argument(
        "--imatrix",
        metavar="FILE",
        help="--to gguf with a k-quant --requantize: weight the rounding by importances"
        " (llama-imatrix's .gguf, or a .safetensors of per-input importances)",
    )
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    add_trust(p)
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    return p


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run ``slimtorch export``; returns the exporter's JSON-able report."""
    from slimtorch.workflows.export import ExportOptions, export_dir

    options = ExportOptions(
        batch=args.batch,
        opset=args.opset,
        dense=args.dense,
        strict=args.strict,
        decode=args.decode,
        static=args.static,
        requantize=args.requantize,
        imatrix=args.imatrix,
        force=args.force,
        model=args.model,
        trust_factory=args.trust_factory,
    )
    return export_dir(args.dir, args.to, args.out, options)


def _render_ct(result: dict[str, Any]) -> str:
    groups = "; ".join(
        f"{g['layers']} layers {g['num_bits']}-bit {g['strategy']}"
        f"{' ' + str(g['group_size']) if g['group_size'] else ''}"
        f" {'sym' if g['symmetric'] else 'asym'}"
        for g in result["config_groups"].values()
    )
    check = result["verified"]
    if check == "transformers":
        check = f"outputs match to {result['max_abs_diff']:.3g}"
    lines = [
        f"wrote {result['out']} ({result['class']}, {result['bytes']:,} bytes): {groups}",
        f"dense: {', '.join(result['ignore']) or 'none'}; reloaded by transformers: {check}",
    ]
    if result.get("dequantized"):
        lines.append(
            f"dequantized to the checkpoint dtype (compressed-tensors quantizes Linear layers"
            f" only): {', '.join(result['dequantized'])}"
        )
    return "\n".join(lines)


def _render_hf(result: dict[str, Any], fits: str) -> str:
    sizes = ", ".join(f"{k} {v}" for k, v in result["sizes"].items())
    return "\n".join(
        [
            f"wrote {result['out']} ({result['class']}, {result['bytes']:,} bytes): {sizes}",
            f"transformers from_pretrained reloads it; {fits}",
        ]
    )


def _render_gguf(result: dict[str, Any]) -> str:
    types = ", ".join(f"{n} {t}" for t, n in result["tensors"].items())
    diffs = ", ".join(f"{k} {v:.3g}" for k, v in result["max_abs_diff_by_type"].items())
    lines = [
        f"wrote {result['out']} ({result['class']}, {result['bytes']:,} bytes, file type"
        f" {result['file_type']}): {types}",
        f"read back as written ({result['codes_kept']} weights keep slimtorch's codes); max"
        f" |difference| from the model's weights: {diffs}",
        f"fp16 rounding: scales {result['scale_rounding_max_abs']:.3g}, Q4_1/Q5_1 offsets"
        f" {result['offset_rounding_max_abs']:.3g}",
    ]
    if result["requantized"]:
        lines.append(f"requantized to {result['requantize']}: {', '.join(result['requantized'])}")
    check = result["llama_cpp"]
    if isinstance(check, str):
        lines.append(f"llama.cpp: {check}")
    else:
        lines.append(
            f"llama.cpp on {check['tokens']} tokens: top-1 agreement"
            f" {check['top1_agreement']:.3f}, max |logit diff| {check['max_abs_logit_diff']:.3g}"
            f" (mean {check['mean_abs_logit_diff']:.3g}), mean KLD {check['kld_mean']:.3g}"
        )
    return "\n".join(lines)


def _render_executorch(result: dict[str, Any]) -> str:  # H-ET
    layouts: dict[str, int] = {}
    for c in result["carried"]:
        layouts[c["layout"]] = layouts.get(c["layout"], 0) + 1
    kinds = ", ".join(f"{n} x {k}" for k, n in layouts.items()) or "none (all fp32)"
    codes = result["codes_in_file"]
    vs = result["vs_model"]
    top1 = f", top-1 agreement {vs['top1_agreement']:.3f}" if "top1_agreement" in vs else ""
    lines = [
        f"wrote {result['out']} ({result['bytes']:,} bytes, ExecuTorch XNNPACK, {result['scheme']})",
        f"our codes lowered as they are: {kinds}; found byte for byte in the file:"
        f" {codes['found']} of {codes['of']}",
        f"ExecuTorch runtime reproduces the lowered model to {result['max_abs_diff']:.3g}"
        f" (allowed {result['allowed']:.3g}); vs slimtorch's model"
        f" {vs['max_abs_diff']:.3g} (relative {vs['relative_diff']:.3g}{top1})",
        f"latency (median): ExecuTorch {result['pte_ms']:.3f} ms"
        f" ({result['executorch_threads'] or '?'} thread(s)), PyTorch {result['torch_ms']:.3f} ms"
        f" ({result['threads']} thread(s))",
    ]
    if result["batchnorm_folded"]:
        lines.append(f"BatchNorm folded into the scales: {len(result['batchnorm_folded'])}")
    lines += [f"dense float: {d['param']} ({d['reason']})" for d in result["dense"]]
    if result["outside_delegate"]:
        ops = ", ".join(f"{n} x {k}" for k, n in result["outside_delegate"].items())
        lines.append(f"outside XNNPACK (portable kernels): {ops}")
    return "\n".join(lines)


def _render_openvino(result: dict[str, Any]) -> str:  # H-OVCM
    consts = ", ".join(f"{t} {v['bytes']:,} B" for t, v in result["constants"].items())
    layers = ", ".join(f"{n} x {k}" for k, n in result["runtime_layers"].items())
    shapes = " and ".join("x".join(map(str, s[0])) for s in result["checked_shapes"])
    lines = [
        f"wrote {result['out']} + .bin ({result['bytes']:,} bytes; fp32 IR"
        f" {result['dense_float_bytes']:,} bytes): constants {consts}",
        f"OpenVINO CPU plugin (f32, no dynamic activation quantization) matches slimtorch to"
        f" {result['max_abs_diff']:.3g} (tolerance {result['atol']} + {result['rtol']} x |value|)"
        f" at input shapes {shapes}; runs {layers}",
        f"latency (1 thread, median): OpenVINO {result['openvino_ms']:.3f} ms (plugin defaults"
        f" {result['openvino_default_ms']:.3f} ms, off by {result['openvino_default_max_abs_diff']:.3g}),"
        f" PyTorch {result['torch_ms']:.3f} ms",
    ]
    lines += [f"dense float: {d['param']} ({d['reason']})" for d in result["dense_layers"]]
    return "\n".join(lines)


def _render_coreml(result: dict[str, Any]) -> str:  # H-OVCM
    kinds: dict[str, int] = {}
    for w in result["compressed_weights"]:
        key = (
            f"LUT {w['lut_entries']} x {w['lut_dtype']} ({w['indices']} indices)"
            if w["op"] == "constexpr_lut_to_dense"
            else f"{w['data']} blockwise shift-scale"
        )
        kinds[key] = kinds.get(key, 0) + 1
    lines = [
        f"wrote {result['out']} ({result['bytes']:,} bytes; fp32 package"
        f" {result['dense_float_bytes']:,} bytes), ML program iOS18, inputs"
        f" {result['input_shapes']}",
        "compressed weights: " + (", ".join(f"{n} x {k}" for k, n in kinds.items()) or "none"),
        f"read back from disk: {result['decoded_equal']} compressed weights decode exactly to"
        " slimtorch's; Core ML cannot run on Linux, so the package was not executed here",
    ]
    lines += [f"dense float: {d['param']} ({d['reason']})" for d in result["dense_layers"]]
    return "\n".join(lines)


def _shapes(result: dict[str, Any]) -> str:
    axes = result.get("dynamic_axes") or {}
    names = ", ".join(
        f"{i['name']} [{', '.join(str(d) for d in i['shape'])}]" for i in result["file_inputs"]
    )
    checked = " and ".join(
        "x".join(str(d) for d in shapes[0]) for shapes in result.get("checked_shapes", [])
    )
    kind = "dynamic" if axes else "static"
    return f" at input shapes {checked}\ninputs ({kind}): {names}"


def render(result: dict[str, Any]) -> str:
    """Plain-text summary of :func:`run`'s result."""
    if result["format"] == "compressed-tensors":
        return _render_ct(result)
    if result["format"] == "gguf":
        return _render_gguf(result)
    if result["format"] == "openvino":
        return _render_openvino(result)
    if result["format"] == "executorch":  # H-ET
        return _render_executorch(result)
    if result["format"] == "coreml":
        return _render_coreml(result)
    fits = (
        f"outputs match to {result['max_abs_diff']:.3g}"
        f" (tolerance {result['atol']} + {result['rtol']} x |value|)"
    )
    if result["format"] == "hf":
        return _render_hf(result, fits)
    lines = [
        f"wrote {result['out']} ({result['bytes']:,} bytes, opset {result['opset']},"
        f" {result['exporter']} exporter)",
        f"onnxruntime {fits}{_shapes(result)}",
        f"latency (1 thread, median): onnxruntime {result['onnxruntime_ms']:.3f} ms,"
        f" PyTorch {result['torch_ms']:.3f} ms",
    ]
    layers = result.get("lowbit_layers") or []
    if layers:
        ops: dict[str, int] = {}
        for layer in layers:
            ops[layer["op"]] = ops.get(layer["op"], 0) + 1
        kinds = ", ".join(f"{n} x {op}" for op, n in ops.items())
        lines.append(
            f"low-bit weights: {kinds}; {result['dense_float_bytes']:,} bytes as dense float"
            f" ({result['dense_float_bytes'] / max(result['bytes'], 1):.2f}x)"
        )
    for d in result.get("dense_layers") or []:
        lines.append(f"dense float: {d['param']} ({d['reason']})")
    if result.get("dynamo_error"):
        lines.append(f"note: the dynamo exporter failed ({result['dynamo_error']})")
    return "\n".join(lines)
