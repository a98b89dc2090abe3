"""llama.cpp's block types for slimtorch's quantization grids: which GGUF type stores a grid
exactly, and the block bytes (pure maths, numpy; no file IO).

A GGUF block holds 32 consecutive weights of a row with fp16 parameters:

- ``Q4_0``: ``x = d * (q - 8)``, ``q`` in 0..15 (18 bytes: d, 16 bytes of nibbles)
- ``Q4_1``: ``x = d * q + m``, ``q`` in 0..15 (20 bytes: d, m, nibbles)
- ``Q5_0``: ``x = d * (q - 16)``, ``q`` in 0..31 (22 bytes: d, 32 high bits, nibbles)
- ``Q5_1``: ``x = d * q + m``, ``q`` in 0..31 (24 bytes)
- ``Q8_0``: ``x = d * q``, ``q`` int8 (34 bytes)
- ``MXFP4``: ``x = 2 ** (e - 127) * e2m1(q)``, ``q`` an E2M1 code (17 bytes: the E8M0 byte
  ``e``, 16 bytes of nibbles): quantize.mxfp4's codes and scales, unchanged

Nibble ``j`` of a block's 16 bytes holds element ``j`` (low) and ``j + 16`` (high). A
slimtorch grid (see :class:`slimtorch.formats.state.QuantState`) maps onto these without
re-rounding any code when its blocks of 32 columns each lie inside one group (per tensor, per
channel, or groups of a multiple of 32 columns, with a multiple of 32 input features):

- symmetric grids ``x = k * scale`` with an integer ``k`` (affine codes at the grid's middle
  zero point; binary ``2c - 1``; ternary ``c - 1``): ``k`` in -8..7 -> Q4_0 (bits <= 4),
  -16..15 -> Q5_0 (5 bits), -128..127 -> Q8_0 (6 to 8 bits); ``d`` = the scale;
- asymmetric affine grids ``x = (c - z) * scale``: ``q = c - qmin``, ``d`` = the scale,
  ``m = -(z - qmin) * scale`` -> Q4_1 (bits <= 4) or Q5_1 (5 bits); 6-8 bit asymmetric grids
  have no GGUF type.

``d`` and ``m`` are stored as fp16. A scale that is already fp16-exact (``scale_dtype``
``float16``, which slimtorch's quantizers choose whenever fp16 holds the scales to 1e-3) is
stored exactly; ``m`` is generally not fp16-exact (``z * d`` needs up to 15 significant bits)
and is rounded to nearest, shifting every weight of its block by the same amount. The exporter
reports both changes (:func:`grid_blocks` returns them).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from slimtorch.formats import floats
from slimtorch.formats.state import QuantState, code_range, dequantize, to_matrix

BLOCK = 32
BYTES = {"Q4_0": 18, "Q4_1": 20, "Q5_0": 22, "Q5_1": 24, "Q8_0": 34, "MXFP4": 17}
SYMMETRIC_TYPES = (("Q4_0", 8), ("Q5_0", 16), ("Q8_0", 128))  # (type, -min k)
FP16_MAX = 65504.0


class NotRepresentable(ValueError):
    """The grid has no exact GGUF block type; the message says why."""


@dataclass
class Blocks:
    """One weight as GGUF blocks: ``data`` uint8 ``[rows, cols / 32 * bytes]`` of type
    ``ggml_type``; ``values`` the float32 ``[rows, cols]`` those blocks decode to;
    ``scale_change`` / ``offset_change``: the largest change of a weight that rounding the
    scales / the Q4_1-Q5_1 offsets ``m`` to fp16 caused (0.0 when exact)."""

    ggml_type: str
    data: np.ndarray
    values: np.ndarray
    scale_change: float
    offset_change: float


def _block_params(q: QuantState, rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point of every block of 32 columns, ``[rows, cols / 32]``; raises
    :class:`NotRepresentable` when a block straddles two groups."""
    if q.granularity == "per_group":
        size = int(q.group_size or 0)
        if size <= 0 or size % BLOCK:
            raise NotRepresentable(
                f"groups of {size} columns: GGUF blocks are 32 columns, so only groups of a"
                " multiple of 32 (32, 64, 128, ...) map exactly"
            )
    starts = torch.arange(0, cols, BLOCK)

    def per_block(t: torch.Tensor) -> torch.Tensor:
        full = q.expand(t, cols) if q.granularity == "per_group" else t
        return full.expand(rows, cols)[:, starts] if full.shape[1] > 1 else full.expand(rows, 1)

    scale = per_block(q.scale.to(torch.float32)).expand(rows, len(starts))
    zero = q.zero_point if q.zero_point.is_floating_point() else q.zero_point.to(torch.int32)
    zp = per_block(zero).expand(rows, len(starts))  # fractional zero points (HQQ) stay float
    return scale, zp


def _symmetric_k(q: QuantState, codes: torch.Tensor, zp: torch.Tensor) -> torch.Tensor | None:
    """The integer ``k`` with ``x = k * scale`` for symmetric grids, else None."""
    if q.scheme == "binary":
        return codes * 2 - 1
    if q.scheme == "ternary":
        return codes - 1
    qmin, _ = code_range(q.bits, q.signed)
    if bool((zp == qmin + 2 ** (q.bits - 1)).all()):
        return codes - zp.repeat_interleave(BLOCK, dim=1)
    return None


def _check_scales(scale: torch.Tensor) -> torch.Tensor:
    if not bool(torch.isfinite(scale).all()) or float(scale.abs().max()) > FP16_MAX:
        raise NotRepresentable(f"scales beyond fp16's range (max {float(scale.abs().max()):.3g})")
    return scale.to(torch.float16)


def _pack_nibbles(q: np.ndarray) -> np.ndarray:
    """``[n, 32]`` values 0..15 -> ``[n, 16]`` bytes (element j low, element j + 16 high)."""
    return (q[:, :16] | (q[:, 16:] << 4)).astype(np.uint8)


def _high_bits(q: np.ndarray) -> np.ndarray:
    """``[n, 32]`` values 0..31 -> ``[n, 4]`` bytes: bit j of the little-endian uint32 holds
    bit 4 of element j."""
    return np.packbits((q >> 4).astype(np.uint8), axis=-1, bitorder="little")


def pack(ggml_type: str, q: np.ndarray, d: np.ndarray, m: np.ndarray | None) -> np.ndarray:
    """Block bytes ``[rows, blocks * bytes]`` of ``ggml_type`` from the stored integers ``q``
    ``[rows, cols]`` (0..15, 0..31, or int8 for Q8_0) and fp16 ``d`` / ``m`` ``[rows, blocks]``."""
    rows, cols = q.shape
    n = rows * (cols // BLOCK)
    qb = q.reshape(n, BLOCK)
    parts = [d.astype(np.float16).reshape(n, 1).view(np.uint8)]
    if ggml_type in ("Q4_1", "Q5_1"):
        assert m is not None
        parts.append(m.astype(np.float16).reshape(n, 1).view(np.uint8))
    if ggml_type == "Q8_0":
        parts.append(qb.astype(np.int8).view(np.uint8))
    else:
        u = qb.astype(np.uint8)
        if ggml_type in ("Q5_0", "Q5_1"):
            parts.append(_high_bits(u))
        parts.append(_pack_nibbles(u & 0x0F))
    return np.concatenate(parts, axis=1).reshape(rows, -1)


def mxfp4_blocks(q: QuantState, mask: torch.Tensor | None, shape: tuple[int, ...]) -> Blocks:
    """An MXFP4 state (E2M1 codes, E8M0 scales over 32 columns) as GGUF ``MXFP4`` blocks,
    bit for bit; :class:`NotRepresentable` for other float states (NVFP4's tensor scale and
    FP8 codes have no GGUF block here)."""
    if q.element != "e2m1" or q.scale_format != "e8m0" or q.group_size != BLOCK:
        raise NotRepresentable(
            f"float codes ({q.element}, blocks of {q.group_size}, {q.scale_format} scales): GGUF"
            " stores MXFP4 (quantize.mxfp4) only among the float formats"
        )
    rows = shape[0]
    codes = to_matrix(q.codes).to(torch.uint8)
    if mask is not None:
        codes = torch.where(to_matrix(mask).to(torch.bool), codes, torch.zeros_like(codes))
    e = floats.encode_e8m0(q.scale.to(torch.float32)).numpy().reshape(-1, 1)
    nibbles = _pack_nibbles(codes.numpy().reshape(-1, BLOCK))
    data = np.concatenate([e, nibbles], axis=1).reshape(rows, -1)
    keep = None if mask is None else to_matrix(mask).to(torch.float32)
    values = to_matrix(dequantize(q, shape))
    values = values if keep is None else values * keep
    return Blocks("MXFP4", data, values.numpy(), 0.0, 0.0)


def grid_blocks(q: QuantState, mask: torch.Tensor | None, shape: tuple[int, ...]) -> Blocks:
    """The GGUF blocks that store the quantized weight of ``shape`` exactly (up to the fp16
    rounding of scales and offsets, measured); raises :class:`NotRepresentable` otherwise."""
    if len(shape) != 2:
        raise NotRepresentable(f"a {len(shape)}-D weight (GGUF blocks store 2-D weights here)")
    if q.scheme == "codebook":
        raise NotRepresentable("a codebook (weight-sharing) grid: GGUF stores integer grids")
    rows, cols = shape
    if cols % BLOCK:
        raise NotRepresentable(f"{cols} input features, not a multiple of GGUF's block of 32")
    if q.scheme == "float":
        return mxfp4_blocks(q, mask, (rows, cols))
    scale, zp = _block_params(q, rows, cols)
    codes = to_matrix(q.codes).to(torch.int32)
    k = _symmetric_k(q, codes, zp)
    expand_blocks = lambda t: t.repeat_interleave(BLOCK, dim=1)  # noqa: E731
    keep = None if mask is None else to_matrix(mask).to(torch.bool)
    d16 = _check_scales(scale)
    d32 = d16.to(torch.float32)
    if k is not None:
        bound = max(-int(k.min()), int(k.max()) + 1) if k.numel() else 1
        ggml_type, half = next(((t, h) for t, h in SYMMETRIC_TYPES if bound <= h), ("", 0))
        if not ggml_type:
            raise NotRepresentable(f"integer levels up to {bound} beyond Q8_0's int8")
        if keep is not None:
            k = torch.where(keep, k, torch.zeros_like(k))
        ideal = k.to(torch.float32) * expand_blocks(scale)
        values = k.to(torch.float32) * expand_blocks(d32)
        stored = k + half if ggml_type != "Q8_0" else k
        data = pack(ggml_type, stored.numpy(), d16.numpy(), None)
        change = float((values - ideal).abs().max()) if values.numel() else 0.0
        return Blocks(ggml_type, data, values.numpy(), change, 0.0)
    if q.scheme != "affine" or q.bits > 5:
        raise NotRepresentable(
            f"an asymmetric {q.bits}-bit grid: GGUF has asymmetric blocks for 4 and 5 bits"
            " (Q4_1, Q5_1) only"
        )
    ggml_type = "Q4_1" if q.bits <= 4 else "Q5_1"
    qmin, _ = code_range(q.bits, q.signed)
    stored = codes - qmin
    zu = zp - qmin
    if keep is not None:  # a pruned weight: the code at the zero point (x = 0 up to m's rounding)
        stored = torch.where(keep, stored, expand_blocks(zu).round().to(stored.dtype))
    m = -(zu.to(torch.float64) * d32.to(torch.float64))
    m16 = m.to(torch.float16)
    if not bool(torch.isfinite(m16).all()):
        raise NotRepresentable("block offsets m = -zero_point * scale beyond fp16's range")
    ideal = (stored - expand_blocks(zu)).to(torch.float32) * expand_blocks(scale)
    exact_d = (stored - expand_blocks(zu)).to(torch.float32) * expand_blocks(d32)
    values = stored.to(torch.float32) * expand_blocks(d32) + expand_blocks(m16.to(torch.float32))
    data = pack(ggml_type, stored.numpy(), d16.numpy(), m16.numpy())
    scale_change = float((exact_d - ideal).abs().max()) if values.numel() else 0.0
    offset_change = float((values - exact_d).abs().max()) if values.numel() else 0.0
    return Blocks(ggml_type, data, values.numpy(), scale_change, offset_change)
