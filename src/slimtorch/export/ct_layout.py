"""The compressed-tensors ``pack-quantized`` layout of one quantized Linear: its grid (bits,
strategy, group size), the packed int32 codes and zero points, the scales, and the
``quantization_config`` block of ``config.json`` (the layout is described in
:mod:`slimtorch.export.compressed_tensors`)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from slimtorch.core.errors import UnsupportedModelError
from slimtorch.export.ct_floats import float_layout, float_scheme, float_tensors
from slimtorch.formats.state import QuantState, WeightState, fractional_zero, to_matrix

log = logging.getLogger("slimtorch.export.compressed_tensors")

FORMAT = "pack-quantized"
SUPPORTED_BITS = (2, 4, 8)
INSTEAD = "export it with --to hf (dense weights) or keep it as a slimtorch artifact"


@dataclass(frozen=True)
class Grid:
    """One compressed-tensors weight scheme (symmetry is decided over all its layers)."""

    bits: int
    strategy: str  # "group" | "channel" | "tensor" (| "tensor_group": NVFP4)
    group_size: int | None
    fmt: str = FORMAT  # the compressed-tensors format (float layouts: see export/ct_floats.py)
    dynamic: bool = False  # FP8 only: dynamic per-token float8 input activations


def pack_int32(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack signed ``bits``-bit codes ``[rows, cols]`` along the columns into int32 words."""
    per_word = 32 // bits
    rows, cols = codes.shape
    words = -(-cols // per_word)
    u = codes.to(torch.int64) + (1 << (bits - 1))
    u = F.pad(u, (0, words * per_word - cols)).reshape(rows, words, per_word)
    shifts = torch.arange(per_word, dtype=torch.int64) * bits
    packed = (u << shifts).sum(dim=-1)  # < 2**32: reinterpret the top bit as the sign
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


def unpack_int32(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """Inverse of :func:`pack_int32`: signed codes ``[rows, cols]`` (int32)."""
    per_word = 32 // bits
    shifts = torch.arange(per_word, dtype=torch.int64) * bits
    u = (packed.to(torch.int64).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return (u.reshape(packed.shape[0], -1)[:, :cols] - (1 << (bits - 1))).to(torch.int32)


def grid_of(name: str, module: nn.Module, state: WeightState) -> Grid:
    """The compressed-tensors grid of one quantized weight, or why it has none."""
    q = state.quant
    where = f"{name} ({type(module).__name__})"
    if q is None:
        raise UnsupportedModelError(
            f"{where} is pruned but not quantized: compressed-tensors 0.20 has no sparse format"
            f" for masks alone; quantize it (e.g. a quantize.rtn stage after pruning) or {INSTEAD}"
        )
    if not isinstance(module, nn.Linear):
        raise UnsupportedModelError(
            f"{where} carries a quantized weight, but this export writes quantized nn.Linear"
            f" layers only; quantize Linear layers only (targets: [Linear]) or {INSTEAD}"
        )
    if q.scheme == "float":
        fmt, strategy, size = float_layout(where, q, module.in_features)
        return Grid(q.bits, strategy, size, fmt)
    if q.scheme != "affine":
        raise UnsupportedModelError(
            f"{where} holds a {q.scheme} grid; compressed-tensors stores affine integer grids"
            f" only (codes, scale, zero point): use quantize.rtn/gptq/awq or {INSTEAD}"
        )
    if fractional_zero(q):
        raise UnsupportedModelError(
            f"{where} has fractional zero points (quantize.hqq's default); compressed-tensors"
            f" stores whole-number zero points: re-compress with quantize.hqq zero_point:"
            f" integer, or export --to gguf (Q4_1 holds them), or {INSTEAD}"
        )
    if q.bits not in SUPPORTED_BITS:
        raise UnsupportedModelError(
            f"{where} is quantized to {q.bits} bits; this export writes {SUPPORTED_BITS} bits"
            f" (packings of other widths differ between compressed-tensors readers): use"
            f" bits 4 or 8, or {INSTEAD}"
        )
    if q.granularity == "per_tensor":
        return Grid(q.bits, "tensor", None)
    if q.granularity == "per_channel":
        return Grid(q.bits, "channel", None)
    assert q.group_size is not None
    if module.in_features % q.group_size:
        raise UnsupportedModelError(
            f"{where} has {module.in_features} input features, not a multiple of its group"
            f" size {q.group_size}: compressed-tensors needs whole groups; re-compress with"
            f" group_size: auto (the largest of 128, 64, 32 dividing every targeted layer) or a"
            f" group size that divides {module.in_features}, leave the layer dense (add it to"
            f" the stage's ignore), or {INSTEAD}"
        )
    return Grid(q.bits, "group", q.group_size)


def signed_grid(q: QuantState, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes ``[out, in]`` and zero points ``[rows, groups]`` (int32) in the signed range the
    reader uses; pruned codes are set to their zero point, so ``(c - zp) * scale`` is 0."""
    offset = 1 << (q.bits - 1)
    codes = to_matrix(q.codes).to(torch.int32)
    zp = q.zero_point.to(torch.int32)
    if mask is not None:
        codes = torch.where(to_matrix(mask), codes, q.expand(zp, codes.shape[1]).expand_as(codes))
    if not q.signed:
        codes, zp = codes - offset, zp - offset
    for what, t in (("codes", codes), ("zero points", zp)):
        if t.numel() and (int(t.min()) < -offset or int(t.max()) >= offset):
            raise UnsupportedModelError(
                f"{what} outside the {q.bits}-bit range [{-offset}, {offset - 1}] after"
                f" conversion; the quantization state is inconsistent: re-run the stage"
            )
    return codes, zp


def layer_tensors(
    q: QuantState,
    codes: torch.Tensor,
    zp: torch.Tensor,
    grid: Grid,
    symmetric: bool,
    dtype: torch.dtype,
) -> dict[str, torch.Tensor]:
    """The tensors of one quantized Linear, by their name under the layer."""
    if grid.fmt != FORMAT:
        return float_tensors(q, codes, grid.fmt)
    scale = q.scale.to(torch.float32)
    if grid.strategy == "tensor":
        scale, zp = scale.reshape(1), zp.reshape(1)
    out = {
        "weight_packed": pack_int32(codes, grid.bits),
        "weight_scale": scale.to(dtype).contiguous(),
        "weight_shape": torch.tensor(list(codes.shape), dtype=torch.int64),
    }
    if not symmetric:
        if grid.strategy == "tensor":
            out["weight_zero_point"] = zp.to(torch.int8)
        else:
            out["weight_zero_point"] = pack_int32(zp.t(), grid.bits).t().contiguous()
    rounded = out["weight_scale"].to(torch.float32)
    if not torch.equal(rounded, scale):
        rel = float(((rounded - scale).abs() / scale.abs().clamp_min(1e-30)).max())
        log.warning("scales rounded to %s (relative error up to %.2g)", dtype, rel)
    return out


def _scheme_dict(grid: Grid, symmetric: bool, targets: list[str]) -> dict[str, Any]:
    if grid.fmt != FORMAT:
        scheme = float_scheme(grid.fmt, grid.strategy, grid.group_size, grid.dynamic)
        return {"targets": targets, **scheme}
    weights = {"num_bits": grid.bits, "type": "int", "symmetric": symmetric}
    weights |= {"strategy": grid.strategy, "group_size": grid.group_size, "dynamic": False}
    weights |= {"block_structure": None, "actorder": None}  # groups are contiguous columns
    none = {"input_activations": None, "output_activations": None}
    return {"targets": targets, "weights": weights, **none, "format": FORMAT}


def quantization_config(
    groups: dict[Grid, list[str]], symmetric: dict[Grid, bool], ignore: list[str]
) -> dict[str, Any]:
    """The ``quantization_config`` block of ``config.json``. One grid targets ``Linear`` (all
    Linear layers but ``ignore``); several grids target their layers by exact name."""
    items = sorted(groups.items(), key=lambda kv: -len(kv[1]))
    config_groups = {
        f"group_{i}": _scheme_dict(grid, symmetric[grid], ["Linear"] if len(items) == 1 else names)
        for i, (grid, names) in enumerate(items)
    }
    formats = {grid.fmt for grid in groups}
    qc: dict[str, Any] = {
        "quant_method": "compressed-tensors",
        "format": formats.pop() if len(formats) == 1 else "mixed-precision",
        "quantization_status": "compressed",
        "config_groups": config_groups,
        "ignore": ignore,
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
        "sparsity_config": {},
    }
    if any(grid.bits == 4 and grid.fmt != FORMAT for grid in groups):
        # compressed-tensors 0.20 decompresses FP4 into bfloat16 parameters, which a float32
        # model cannot multiply: transformers' dequantize route casts them to the model's dtype
        qc["dequantize"] = True
    if not all(symmetric.values()):
        if len(items) == 1:
            qc["dequantize"] = True  # transformers' compressed route misreads packed zero points
        else:
            log.warning(
                "asymmetric grids in %d config groups: the layout is valid (vLLM reads it), but"
                " transformers <= 5.24 with compressed-tensors <= 0.20 cannot load it (its"
                " compressed route misshapes packed zero points, its dequantize route applies"
                " the first group's scheme to every layer); use one grid or symmetric grids",
                len(items),
            )
    return qc
