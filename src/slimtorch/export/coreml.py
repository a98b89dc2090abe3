"""Core ML ``.mlpackage`` (ML program, iOS18 opset) keeping slimtorch's compressed weights.

The model (``Int8DynamicLinear`` layers as float Linear twins, weights float32) goes through
``torch.export`` and coremltools' converter into a MIL program; every weight ``const`` that holds
a compressed weight (matched by value) is replaced by Core ML's compile-time decompression op
with our codes unchanged:

=========================  ===================================================================
slimtorch weight           Core ML (iOS18)
=========================  ===================================================================
codebook (k-means)         ``constexpr_lut_to_dense``: uint1/2/3/4/6/8 indices, our codebook as
                           the per-tensor LUT (padded with zeros to 2^nbits entries)
affine per row / tensor    ``constexpr_blockwise_shift_scale``: int4/uint4 (<= 4 bits) or
                           int8/uint8 codes, float32 scale and integer offset per output channel
affine per group           the same with one scale per block of ``group`` columns of the
                           ``[out, K]`` view (a ragged last group padded, then ``slice_by_index``);
                           a convolution's groups run along slimtorch's ``[out, kh*kw*in]``
                           view, so a ``reshape``/``transpose`` gives ``[out, in, kh, kw]``
binary / ternary           int4 codes -1/0/+1 and the scale (offset 0)
=========================  ===================================================================

Linux cannot run Core ML models (no Core ML framework): the package is verified by reading it
back from disk (its MIL program and weight blob, :mod:`slimtorch.export.coreml_read`), decoding
every compressed weight as Core ML defines the ops and comparing with the model's weights
(exactly). Inputs are fixed to the example's shapes.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from slimtorch.core.errors import ArtifactError, ConfigError
from slimtorch.export.checks import refuse_runtime_modules
from slimtorch.export.onnx.sources import Matcher, Source, collect_sources, float_twin
from slimtorch.formats.atomic import fsync_dir, temp_sibling

LUT_BITS = (1, 2, 3, 4, 6, 8)  # the index widths constexpr_lut_to_dense takes
# passes that fold a BatchNorm or a scale into a convolution's weight (values that no longer
# decode from its codes); Core ML applies the same fusions itself when it compiles the model
_FOLDING_PASSES = ["common::fuse_conv_batchnorm", "common::fuse_conv_scale"]


def coremltools() -> Any:
    try:
        import coremltools as ct
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ConfigError(
            "export --to coreml needs the coremltools package: pip install coremltools==9.0"
            " (or slimtorch[coreml])"
        ) from exc
    return ct


def exported_program(model: nn.Module, args: tuple[Any, ...]) -> Any:
    """``torch.export`` of ``model`` with the core ATen decompositions coremltools expects;
    ``max_pool2d`` gets its default stride spelled out (coremltools 9 needs 3 arguments)."""
    ep = torch.export.export(model, args).run_decompositions({})
    for node in ep.graph.nodes:
        if node.target is torch.ops.aten.max_pool2d.default and len(node.args) == 2:
            node.args = (*node.args, node.args[1])
    ep.graph_module.recompile()
    return ep


def _convert(ct: Any, ep: Any, fold: bool = False) -> Any:
    """The float32 ML program of ``ep`` (not loaded: Core ML does not run on Linux); ``fold``:
    with coremltools' BatchNorm folding (the plain fp32 package, for its size)."""
    pipeline = ct.PassPipeline.DEFAULT
    if not fold:
        pipeline.remove_passes(_FOLDING_PASSES)
    return ct.convert(
        ep,
        convert_to="mlprogram",
        minimum_deployment_target=ct.target.iOS18,
        compute_precision=ct.precision.FLOAT32,
        pass_pipeline=pipeline,
        skip_model_load=True,
    )


def _compressed(ct: Any, fp32: Any, sources: Sequence[Source]) -> tuple[Any, list[dict[str, Any]]]:
    """``fp32`` with the weights of ``sources`` as Core ML decompression ops."""
    from coremltools.converters.mil.mil.passes.graph_pass import AbstractGraphPass
    from coremltools.models.utils import _apply_graph_pass

    rows: list[dict[str, Any]] = []

    class _Keep(AbstractGraphPass):  # type: ignore[misc]
        def apply(self, prog: Any) -> None:
            rows.extend(compress_program(prog, sources))

    ios18 = ct._SPECIFICATION_VERSION_IOS_18
    model = _apply_graph_pass(fp32, _Keep(), spec_version=ios18, skip_model_load=True)
    return model, rows


def _int_dtype(bits: int, signed: bool) -> Any:
    from coremltools.converters.mil.mil import types

    if bits <= 4:
        return types.np_int4_dtype if signed else types.np_uint4_dtype
    return np.dtype(np.int8 if signed else np.uint8)


def _natural(codes: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    from slimtorch.formats.state import from_matrix

    return from_matrix(torch.from_numpy(codes), shape).numpy()


def _lut(mb: Any, src: Source, shape: tuple[int, ...], before: Any) -> Any:
    from coremltools.converters.mil.mil import types

    assert src.codebook is not None
    nbits = next(b for b in LUT_BITS if 2**b >= src.codebook.size)
    lut = np.zeros(2**nbits, np.float32)
    lut[: src.codebook.size] = src.codebook
    idx = _natural(src.codes, shape).astype(types.nptype_from_builtin(types.string_to_builtin(
        f"uint{nbits}")))  # fmt: skip
    return mb.constexpr_lut_to_dense(
        indices=idx, lut=lut.reshape((1,) * len(shape) + (2**nbits, 1)), before_op=before
    )


def _affine(mb: Any, src: Source, shape: tuple[int, ...], before: Any) -> Any:
    out, k = src.codes.shape
    dtype = _int_dtype(src.bits, src.signed)
    group = src.group if src.group is not None and src.group < k else None  # one group: a row
    if group is None:
        data = _natural(src.codes, shape)
        scale = src.scale.reshape(out, -1)[:, :1].reshape((out,) + (1,) * (len(shape) - 1))
        zp = src.zero_point.reshape(out, -1)[:, :1].reshape(scale.shape)
    else:  # blocks of ``group`` columns of the [out, K] view; a ragged last one padded
        n = -(-k // group)
        pad = np.repeat(src.zero_point[:, -1:], n * group - k, axis=1)
        data = np.concatenate([src.codes, pad], axis=1)
        scale, zp = src.scale, src.zero_point
    offset = zp.astype(dtype) if np.any(zp != 0) else None
    node = mb.constexpr_blockwise_shift_scale(
        data=data.astype(dtype), scale=scale.astype(np.float32), offset=offset, before_op=before
    )
    if group is not None and data.shape[-1] != k:  # drop the padding
        node = mb.slice_by_index(
            x=node, begin=np.array([0, 0], np.int32), end=np.array([out, k], np.int32),
            before_op=before,
        )  # fmt: skip
    if group is not None and len(shape) > 2:
        permuted = (shape[0], *shape[2:], shape[1])
        node = mb.reshape(x=node, shape=np.array(permuted, np.int32), before_op=before)
        perm = (0, len(shape) - 1, *range(1, len(shape) - 1))
        node = mb.transpose(x=node, perm=np.array(perm, np.int32), before_op=before)
    return node


def compress_program(prog: Any, sources: Sequence[Source]) -> list[dict[str, Any]]:
    """Replace every float ``const`` of ``prog`` holding a source's weights (same layout) by
    Core ML's decompression op; one row per weight written compressed."""
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil.passes.helper import block_context_manager

    matcher = Matcher(list(sources))
    rows: list[dict[str, Any]] = []

    @block_context_manager
    def rewrite(block: Any) -> None:
        for op in list(block.operations):
            val = op.outputs[0].val if op.op_type == "const" else None
            if not isinstance(val, np.ndarray) or val.dtype != np.float32 or val.ndim < 2:
                continue
            found = matcher.match("", val)
            if found is None or found.layout != "same":
                continue
            src, shape = found.source, tuple(val.shape)
            build = _lut if src.codebook is not None else _affine
            new = build(mb, src, shape, op)
            block.replace_uses_of_var_after_op(
                anchor_op=op, old_var=op.outputs[0], new_var=new, no_check_var_types=True
            )
            block.remove_ops([op])
            rows.append({"param": src.param, "const": op.name})

    for func in prog.functions.values():
        rewrite(func)
    return rows


def _tree_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def export_coreml(
    model: nn.Module, inputs: Sequence[Any], out: str | Path, overwrite: bool = False
) -> dict[str, Any]:
    """Write the ``.mlpackage`` ``out`` keeping compressed weights, read it back and check
    every compressed weight decodes to the model's; the report (it cannot run on Linux)."""
    ct = coremltools()
    out = Path(out)
    if out.suffix != ".mlpackage":
        raise ConfigError(f"--out {out} must end in .mlpackage (a Core ML ML program package)")
    if out.exists() and not overwrite:
        raise ArtifactError(f"{out} exists; pass --force / overwrite=True to replace it")
    refuse_runtime_modules(model)
    from slimtorch.export.coreml_read import read_package

    model.eval()
    twin, dynamic = float_twin(model)
    sources, dense = collect_sources(model)
    sources += dynamic
    with torch.no_grad():
        ep = exported_program(twin, tuple(inputs))
    fp32 = _convert(ct, ep, fold=True)
    compressed, rows = _compressed(ct, _convert(ct, ep), sources)
    done = {r["param"] for r in rows}
    dense += [
        {"param": s.param, "reason": "no const of the converted program holds its values"}
        for s in sources
        if s.param not in done
    ]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(out)
    tmp.mkdir()
    try:
        fp32.save(str(tmp / "fp32.mlpackage"))
        compressed.save(str(tmp / "model.mlpackage"))
        check = read_package(tmp / "model.mlpackage", sources)
        fp32_bytes = _tree_bytes(tmp / "fp32.mlpackage")
        if out.exists():
            shutil.rmtree(out)
        (tmp / "model.mlpackage").rename(out)
        fsync_dir(out.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {
        "format": "coreml",
        "out": str(out),
        "bytes": _tree_bytes(out),
        "dense_float_bytes": fp32_bytes,
        "coremltools": ct.__version__,
        "runs_here": False,
        "verified": "read back: MIL program and weights decoded (Core ML cannot run on Linux)",
        "dense_layers": dense,
        "input_shapes": [list(t.shape) for t in inputs],
        **check,
    }
