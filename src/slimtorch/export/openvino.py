"""OpenVINO IR (``.xml`` + ``.bin``) that keeps slimtorch's low-bit weights compressed.

The model (``Int8DynamicLinear`` layers as float Linear twins) goes through OpenVINO's PyTorch
frontend; every weight constant that holds a compressed weight (matched by name and checked by
value) is held as a placeholder while the optimizations ``convert_model`` applies run (they
would fold BatchNorm into the convolution weights), then replaced by the decompression subgraph OpenVINO's weight
compression uses (NNCF writes the same shapes), with our codes and scales unchanged:

=========================  ===================================================================
slimtorch weight           OpenVINO IR
=========================  ===================================================================
affine, <= 4 bits          ``Constant`` u4/i4 codes -> ``Convert`` f32 (-> ``Subtract`` zero point
                           u4/i4) -> ``Multiply`` f32 scale per row, or ``[out, G, group]``
                           + ``Reshape`` for groups (a ragged last group: padded, then ``Slice``)
affine, 5-8 bits           the same with u8/i8 codes
binary / ternary           i4 codes -1/0/+1 -> ``Convert`` -> ``Multiply`` scale
codebook (k-means)         u4 (<= 16 entries) or u8 indices -> ``Gather`` from the f32 codebook
=========================  ===================================================================

Convolution weights go back to ``[out, in, kh, kw]`` with a ``Reshape``/``Transpose`` where
their codes are grouped along slimtorch's ``[out, kh*kw*in]`` matrix view. Scales stay float32 so
the file decodes to exactly the model's weights; the IR is saved without fp16 compression. The
file is read back, run by the CPU plugin with the f32 precision hint (it runs bf16 by default on
CPUs with AMX/AVX-512 BF16) at two batch sizes and compared with the model's outputs within the
ONNX export's tolerance. Everything else (fp8/fp4 float grids, HQQ's fractional zero points,
masks alone) stays dense float and is listed with the reason.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from slimtorch.core.errors import ArtifactError, ConfigError, UnsupportedModelError
from slimtorch.export.checks import refuse_runtime_modules
from slimtorch.export.onnx.sources import Source, collect_sources, float_twin
from slimtorch.export.openvino_check import EXACT, verify
from slimtorch.formats.atomic import fsync_dir, temp_sibling


def _openvino() -> Any:
    try:
        import openvino
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ConfigError(
            "export --to openvino needs the openvino package: pip install openvino==2026.4.0"
            " (or slimtorch[openvino])"
        ) from exc
    return openvino


def _codes_type(ov: Any, src: Source) -> Any:
    if src.codebook is not None:
        return ov.Type.u4 if src.codebook.size <= 16 else ov.Type.u8
    small = src.bits <= 4
    if src.signed:
        return ov.Type.i4 if small else ov.Type.i8
    return ov.Type.u4 if small else ov.Type.u8


def _natural(src: Source, shape: tuple[int, ...]) -> np.ndarray:
    """The ``[out, K]`` matrix-view codes in the parameter's own layout."""
    if len(shape) <= 2:
        return src.codes.reshape(shape)
    t = torch.from_numpy(src.codes)
    from slimtorch.formats.state import from_matrix

    return from_matrix(t, shape).numpy()


def _affine(ops: Any, ov: Any, src: Source, shape: tuple[int, ...]) -> Any:
    """codes -> Convert -> (Subtract zp) -> Multiply scale [-> Reshape / Slice / Transpose]."""
    ctype = _codes_type(ov, src)
    out, k = src.codes.shape
    group = src.group
    if group is None:  # per row or per tensor: codes in the parameter's own layout
        codes = _natural(src, shape)
        bshape = (out,) + (1,) * (len(shape) - 1)
        scale, zp = src.scale.reshape(out, -1)[:, :1], src.zero_point.reshape(out, -1)[:, :1]
    else:
        n = -(-k // group)
        pad = np.repeat(src.zero_point, group, axis=1)[:, k:] if n * group > k else None
        codes = src.codes if pad is None else np.concatenate([src.codes, pad], axis=1)
        codes = codes.reshape(out, n, group)
        bshape = (out, n, 1)
        scale, zp = src.scale, src.zero_point
    node = ops.convert(ops.constant(codes.astype(np.int8 if src.signed else np.uint8), ctype),
                       "f32")  # fmt: skip
    if np.any(zp != 0):
        zp_const = ops.constant(zp.reshape(bshape).astype(np.int8 if src.signed else np.uint8),
                                ctype)  # fmt: skip
        node = ops.subtract(node, ops.convert(zp_const, "f32"))
    node = ops.multiply(node, ops.constant(scale.reshape(bshape).astype(np.float32)))
    if group is None:
        return node
    node = ops.reshape(node, ops.constant(np.array([out, -1], np.int64)), False)
    if node.get_output_partial_shape(0)[1].get_length() != k:
        i64 = np.int64
        node = ops.slice(node, ops.constant(np.array([0], i64)), ops.constant(np.array([k], i64)),
                         ops.constant(np.array([1], i64)), ops.constant(np.array([1], i64)))  # fmt: skip
    if len(shape) > 2:  # grouped conv: [out, kh*kw*in] -> [out, kh, kw, in] -> [out, in, kh, kw]
        permuted = (shape[0], *shape[2:], shape[1])
        node = ops.reshape(node, ops.constant(np.array(permuted, np.int64)), False)
        perm = (0, len(shape) - 1, *range(1, len(shape) - 1))
        node = ops.transpose(node, ops.constant(np.array(perm, np.int64)))
    return node


def _lut(ops: Any, ov: Any, src: Source, shape: tuple[int, ...]) -> Any:
    """u4/u8 indices -> Gather from the float32 codebook (NNCF's codebook layout)."""
    assert src.codebook is not None
    idx = ops.constant(_natural(src, shape).astype(np.uint8), _codes_type(ov, src))
    if _codes_type(ov, src) == ov.Type.u4:
        idx = ops.convert(idx, "u8")
    book = ops.constant(src.codebook.astype(np.float32))
    return ops.gather(book, idx, ops.constant(np.array(0, np.int64)))


def hold_weights(ov_model: Any, sources: Sequence[Source]) -> list[tuple[Any, Source]]:
    """Swap every float weight constant of ``ov_model`` holding a source (by name, checked by
    value) for a placeholder ``Parameter``, so that graph optimizations cannot fold anything
    (BatchNorm scales) into it; the placeholders and their sources."""
    ov = _openvino()
    import openvino.opset13 as ops

    by_name = {s.param: s for s in sources}
    held = []
    for node in ov_model.get_ordered_ops():
        if node.get_type_name() != "Constant" or node.get_element_type() != ov.Type.f32:
            continue
        src = by_name.get(node.get_friendly_name().removeprefix("self."))
        if src is None or not np.array_equal(node.get_data(), src.weight):
            continue
        param = ops.parameter(list(src.weight.shape), np.float32, name=f"slimtorch.{src.param}")
        node.output(0).replace(param.output(0))
        ov_model.add_parameters([param])
        held.append((param, src))
    return held


def fill_weights(ov_model: Any, held: Sequence[tuple[Any, Source]]) -> list[dict[str, Any]]:
    """Replace each placeholder of :func:`hold_weights` by its source's low-bit decompression
    subgraph, checked to decode to the weight exactly; one row per weight."""
    ov = _openvino()
    import openvino.opset13 as ops

    rows = []
    for param, src in held:
        shape = tuple(src.weight.shape)
        new = (
            _lut(ops, ov, src, shape) if src.codebook is not None else _affine(ops, ov, src, shape)
        )
        decoded = _decode(new)
        if decoded is None or not np.array_equal(decoded, src.weight):
            raise UnsupportedModelError(
                f"OpenVINO's decompression of {src.param} does not give its weights back"
            )
        param.output(0).replace(new.output(0))
        ov_model.remove_parameter(param)
        kind = "lut" if src.codebook is not None else "affine"
        rows.append(
            {"param": src.param, "kind": kind, "codes": _codes_type(ov, src).get_type_name()}
        )
    ov_model.validate_nodes_and_infer_types()
    return rows


def _decode(node: Any) -> np.ndarray | None:
    """Constant-fold ``node``'s subgraph (what the plugin computes at load time)."""
    ov = _openvino()
    params: list[Any] = []
    tmp = ov.Model([node.output(0)], params, "decode")
    compiled = ov.Core().compile_model(tmp, "CPU", EXACT)
    return np.asarray(compiled({})[0])


def _place(tmp: Path, out: Path, overwrite: bool) -> None:
    for f in (out, out.with_suffix(".bin")):
        if f.exists() and not overwrite:
            raise ArtifactError(f"{f} exists; pass --force / overwrite=True to replace it")
    os.replace(tmp / "model.bin", out.with_suffix(".bin"))
    os.replace(tmp / "model.xml", out)
    fsync_dir(out.parent)


def export_openvino(
    model: nn.Module, inputs: Sequence[Any], out: str | Path, overwrite: bool = False
) -> dict[str, Any]:
    """Write ``out`` (``.xml``, weights in the ``.bin`` beside it) keeping low-bit weights,
    check it in OpenVINO's CPU plugin (f32) and time it against PyTorch; the report."""
    ov = _openvino()
    out = Path(out)
    if out.suffix != ".xml":
        raise ConfigError(f"--out {out} must end in .xml (OpenVINO IR; the .bin goes beside it)")
    for f in (out, out.with_suffix(".bin")):
        if f.exists() and not overwrite:
            raise ArtifactError(f"{f} exists; pass --force / overwrite=True to replace it")
    refuse_runtime_modules(model)
    args = tuple(inputs)
    model.eval()
    twin, dynamic = float_twin(model)
    sources, dense = collect_sources(model)
    ov_model = _frontend_model(twin, args)
    dense_model = ov_model.clone()
    held = hold_weights(ov_model, sources + dynamic)
    for m in (ov_model, dense_model):
        _optimize(m)
    rows = fill_weights(ov_model, held)
    done = {r["param"] for r in rows}
    dense += [
        {"param": s.param, "reason": "no constant of the converted graph holds its values"}
        for s in sources + dynamic
        if s.param not in done
    ]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(out)
    tmp.mkdir()
    try:
        ov.save_model(ov_model, str(tmp / "model.xml"), compress_to_fp16=False)
        ov.save_model(dense_model, str(tmp / "dense.xml"), compress_to_fp16=False)
        dense_bytes = (tmp / "dense.bin").stat().st_size + (tmp / "dense.xml").stat().st_size
        # dynamic int8 layers: the IR holds their int8 weights but leaves the activations to
        # OpenVINO, so it is checked against the weight-only twin; the gap is reported
        report = verify(ov, twin if dynamic else model, tmp / "model.xml", args)
        if dynamic:
            report["checked_against"] = "weight-only twin (activations float, not per-token int8)"
            report["dynamic_int8_max_abs_diff"] = _gap(model, twin, args)
        _place(tmp, out, overwrite)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {
        "format": "openvino",
        "out": str(out),
        "files": [str(out), str(out.with_suffix(".bin"))],
        "bytes": out.stat().st_size + out.with_suffix(".bin").stat().st_size,
        "dense_float_bytes": dense_bytes,
        "openvino": ov.__version__,
        "lowbit_layers": rows,
        "dense_layers": dense,
        **report,
    }


def _gap(model: nn.Module, twin: nn.Module, args: tuple[Any, ...]) -> float:
    """Largest |output difference| between ``model`` and its weight-only twin."""
    with torch.no_grad():
        a, b = model(*args), twin(*args)
    return float((a - b).abs().max()) if isinstance(a, torch.Tensor) else float("nan")


def _frontend_model(twin: nn.Module, args: tuple[Any, ...]) -> Any:
    """The PyTorch frontend's graph of ``twin`` before ``convert_model``'s optimizations (which
    fold BatchNorm into convolution weights: values that no longer decode from the codes)."""
    from openvino.frontend import FrontEndManager
    from openvino.frontend.pytorch.ts_decoder import TorchScriptPythonDecoder

    frontend = FrontEndManager().load_by_framework("pytorch")
    with torch.no_grad():
        decoder = TorchScriptPythonDecoder(twin, example_input=args)
        return frontend.convert(frontend.load(decoder))


def _optimize(ov_model: Any) -> None:
    """What ``convert_model`` applies after the frontend; it keeps decompression subgraphs."""
    from openvino._offline_transformations import (
        apply_fused_names_cleanup,
        apply_moc_transformations,
    )

    apply_moc_transformations(ov_model, cf=False, smart_reshape=True)
    apply_fused_names_cleanup(ov_model)
