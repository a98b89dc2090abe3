"""KIVI-style integer quantization of attention keys and values, pure maths over tensors.

Keys ``[B, H, T, D]`` are quantized **per channel**: every channel ``d`` of every group of
``group`` consecutive tokens gets its own scale and minimum (outlier channels, which keys have,
get their own range). Values are quantized **per token**: every token's ``D`` channels are cut
into groups of ``group`` consecutive channels, each with its own scale and minimum. Both are
asymmetric min-max: ``code = clamp(round((x - zero) / scale), 0, 2**bits - 1)`` and
``x ~ code * scale + zero`` with ``zero`` the group's minimum and
``scale = (max - min) / (2**bits - 1)``, both stored in :data:`PARAM_DTYPE` (float16, as KIVI)
and the codes computed from the stored (rounded) parameters, so the round trip error of an
element is at most ``scale / 2`` plus float16 rounding of its group's range.

Codes are packed along the channel dimension, ``8 // bits`` codes a byte (value ``j`` of a byte
in bits ``[j * bits, (j + 1) * bits)``), on the tensor's own device. KIVI: Liu et al., "KIVI: A
Tuning-Free Asymmetric 2bit Quantization for KV Cache", ICML 2024.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from slimtorch.core.errors import ConfigError

PARAM_DTYPE = torch.float16
BITS = (2, 4, 8)


@dataclass(frozen=True)
class QuantizedKV:
    """Packed codes ``[B, H, T, D * bits / 8]`` (uint8) with their ``scale`` and ``zero``:
    ``[B, H, T / group, D]`` for keys (per channel), ``[B, H, T, D / group]`` for values."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    bits: int

    @property
    def nbytes(self) -> int:
        """Bytes held: codes, scales and minimums."""
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scale, self.zero))


@dataclass(frozen=True)
class KVQuantConfig:
    """``bits`` (2, 4 or 8) of the codes; ``group``: tokens per key scale and channels per value
    scale (must divide the head dimension); ``window``: recent tokens kept exact (>= 0)."""

    bits: int = 8
    group: int = 32
    window: int = 128

    def __post_init__(self) -> None:
        if self.bits not in BITS:
            raise ConfigError(f"--kv-bits must be one of {list(BITS)}, not {self.bits}")
        if self.group < 1 or self.group & (self.group - 1):
            raise ConfigError(
                f"--kv-group must be a power of two >= 1 (e.g. 32, 64), not {self.group}"
            )
        if self.window < 0:
            raise ConfigError(f"--kv-window must be >= 0 tokens, not {self.window}")

    def check_head_dim(self, head_dim: int) -> None:
        """Raise when ``head_dim`` cannot be cut into value groups / packed bytes."""
        if head_dim % self.group or head_dim % (8 // self.bits):
            raise ConfigError(
                f"--kv-group {self.group} must divide the head dimension {head_dim}: give a"
                f" smaller power of two (e.g. {min(32, head_dim & -head_dim)})"
            )


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 codes ``< 2**bits`` along the last dimension, ``8 // bits`` per byte."""
    per = 8 // bits
    if bits == 8:
        return codes.to(torch.uint8)
    if codes.shape[-1] % per:
        raise ValueError(f"{bits}-bit packing needs a last dimension divisible by {per}")
    cols = codes.to(torch.uint8).reshape(*codes.shape[:-1], -1, per)
    out = cols[..., 0].clone()
    for j in range(1, per):
        out |= cols[..., j] << (j * bits)
    return out


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: uint8 codes, last dimension ``8 // bits`` times longer."""
    if bits == 8:
        return packed
    per, mask = 8 // bits, (1 << bits) - 1
    cols = [(packed >> (j * bits)) & mask for j in range(per)]
    return torch.stack(cols, dim=-1).reshape(*packed.shape[:-1], -1)


def minmax_params(
    lo: torch.Tensor, hi: torch.Tensor, bits: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, zero)`` in :data:`PARAM_DTYPE` of groups with minimum ``lo`` and maximum
    ``hi``; a group whose range rounds to a zero scale gets scale 1 (all its codes are 0)."""
    zero = lo.to(PARAM_DTYPE)
    scale = ((hi.float() - zero.float()) / float((1 << bits) - 1)).to(PARAM_DTYPE)
    return torch.where(scale > 0, scale, torch.ones_like(scale)), zero


def affine_codes(
    x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int
) -> torch.Tensor:
    """uint8 codes of ``x`` under ``scale`` / ``zero`` (broadcast against ``x``)."""
    q = torch.round((x.float() - zero.float()) / scale.float())
    return q.clamp_(0, (1 << bits) - 1).to(torch.uint8)


def _check(x: torch.Tensor, bits: int) -> None:
    if bits not in BITS:
        raise ValueError(f"KV cache bits must be one of {BITS}, not {bits}")
    if x.dim() != 4:
        raise ValueError(f"keys/values must be [batch, heads, tokens, head_dim], got {x.shape}")


def quantize_keys(k: torch.Tensor, bits: int, group: int) -> QuantizedKV:
    """Per-channel quantization of keys ``[B, H, T, D]``, ``T`` a multiple of ``group``: one
    scale and minimum per channel per ``group`` consecutive tokens."""
    _check(k, bits)
    b, h, t, d = k.shape
    if t % group:
        raise ValueError(f"key tokens ({t}) must be a multiple of the group ({group})")
    blocks = k.reshape(b, h, t // group, group, d)
    scale, zero = minmax_params(blocks.amin(dim=3), blocks.amax(dim=3), bits)
    codes = affine_codes(blocks, scale[:, :, :, None], zero[:, :, :, None], bits)
    return QuantizedKV(pack_codes(codes.reshape(b, h, t, d), bits), scale, zero, bits)


def dequantize_keys(q: QuantizedKV, dtype: torch.dtype) -> torch.Tensor:
    """Keys ``[B, H, T, D]`` in ``dtype`` from :func:`quantize_keys`' output."""
    b, h, chunks, d = q.scale.shape
    codes = unpack_codes(q.codes, q.bits).reshape(b, h, chunks, -1, d).float()
    x = codes * q.scale[:, :, :, None].float() + q.zero[:, :, :, None].float()
    return x.reshape(b, h, -1, d).to(dtype)


def quantize_values(v: torch.Tensor, bits: int, group: int) -> QuantizedKV:
    """Per-token quantization of values ``[B, H, T, D]``, ``D`` a multiple of ``group``: one
    scale and minimum per token per ``group`` consecutive channels."""
    _check(v, bits)
    b, h, t, d = v.shape
    if d % group:
        raise ValueError(f"the head dimension ({d}) must be a multiple of the group ({group})")
    blocks = v.reshape(b, h, t, d // group, group)
    scale, zero = minmax_params(blocks.amin(dim=4), blocks.amax(dim=4), bits)
    codes = affine_codes(blocks, scale[..., None], zero[..., None], bits)
    return QuantizedKV(pack_codes(codes.reshape(b, h, t, d), bits), scale, zero, bits)


def dequantize_values(q: QuantizedKV, dtype: torch.dtype) -> torch.Tensor:
    """Values ``[B, H, T, D]`` in ``dtype`` from :func:`quantize_values`' output."""
    b, h, t, groups = q.scale.shape
    codes = unpack_codes(q.codes, q.bits).reshape(b, h, t, groups, -1).float()
    x = codes * q.scale[..., None].float() + q.zero[..., None].float()
    return x.reshape(b, h, t, -1).to(dtype)


def concat(a: QuantizedKV | None, b: QuantizedKV) -> QuantizedKV:
    """``a`` followed by ``b`` along the tokens (codes and parameters both along dim 2)."""
    if a is None:
        return b
    return QuantizedKV(
        torch.cat([a.codes, b.codes], dim=2),
        torch.cat([a.scale, b.scale], dim=2),
        torch.cat([a.zero, b.zero], dim=2),
        a.bits,
    )


def select_batch(q: QuantizedKV, index: torch.Tensor) -> QuantizedKV:
    """The batch rows ``index`` of ``q`` (beam reordering, batch selection: exact, as every
    scale belongs to one batch row)."""
    index = index.to(q.codes.device)
    return QuantizedKV(q.codes[index], q.scale[index], q.zero[index], q.bits)


def bytes_per_token(bits: int, group: int, head_dim: int, param_bytes: int = 2) -> float:
    """Bytes per token per KV head of the quantized part (keys and values together): codes
    ``2 * head_dim * bits / 8``, plus a scale and a minimum per channel per ``group`` tokens
    (keys) and per ``group`` channels per token (values)."""
    codes = 2 * head_dim * bits / 8
    return codes + 2 * (2 * param_bytes * head_dim / group)
