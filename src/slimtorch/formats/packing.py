"""Bit packing of small unsigned integers and boolean masks into bytes.

Bit order: the values form one little-endian bit stream. Value ``i`` occupies stream bits
``[i * bits, (i + 1) * bits)``, least significant bit first, and stream bit ``k`` is bit
``k % 8`` (``1 << (k % 8)``) of byte ``k // 8``. So with ``bits=4`` byte 0 holds value 0 in its
low nibble and value 1 in its high nibble; with ``bits=1`` value ``i`` is bit ``i % 8`` of byte
``i // 8``. ``count`` values take exactly ``ceil(count * bits / 8)`` bytes; unused high bits of
the last byte are zero.

Vectorised: 1, 2 and 4 bits pack whole values per byte with bytewise shifts; other widths turn
blocks of 8 values into ``bits`` bytes through one 64-bit integer per block. Packing 12M values
is a handful of tensor operations (well under a second at 1, 2, 4 and 8 bits, about a second at
3, 5, 6 and 7 on one core).
"""

from __future__ import annotations

import torch

_INT_DTYPES = {
    torch.uint8,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.uint16,
    torch.uint32,
}


def packed_size(count: int, bits: int) -> int:
    """Bytes that ``count`` values of ``bits`` bits take when packed."""
    _check_bits(bits)
    return (count * bits + 7) // 8


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or isinstance(bits, bool) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an integer in 1..8, got {bits!r}")


def pack_bits(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack non-negative integers ``< 2**bits`` (any shape, flattened) into a 1-D uint8 tensor."""
    _check_bits(bits)
    if values.dtype not in _INT_DTYPES:
        raise TypeError(f"pack_bits needs an integer tensor, got {values.dtype}")
    flat = values.detach().reshape(-1).cpu()
    if flat.dtype in (torch.uint16, torch.uint32):  # few kernels exist for these
        flat = flat.to(torch.int64)
    count = flat.numel()
    if count and (int(flat.min()) < 0 or int(flat.max()) >= 2**bits):
        raise ValueError(
            f"values must lie in [0, {2**bits - 1}] to pack at {bits} bits;"
            f" got [{int(flat.min())}, {int(flat.max())}]"
        )
    if bits == 8:
        return flat.to(torch.uint8).clone()
    if 8 % bits == 0:
        return _pack_pow2(flat.to(torch.uint8), bits)
    blocks = (count + 7) // 8
    padded = torch.zeros(blocks * 8, dtype=torch.int64)
    padded[:count] = flat
    cols = padded.view(blocks, 8)
    words = cols[:, 0].clone()  # 8 values of <= 7 bits: at most 56 bits, no overflow
    for j in range(1, 8):
        words |= cols[:, j] << (j * bits)
    out = torch.empty(blocks, bits, dtype=torch.uint8)
    for j in range(bits):
        out[:, j] = (words >> (8 * j)) & 0xFF
    return out.reshape(-1)[: packed_size(count, bits)].clone()


def unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the first ``count`` values, as a 1-D uint8 tensor."""
    _check_bits(bits)
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed data must be uint8, got {packed.dtype}")
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    flat = packed.detach().reshape(-1).cpu()
    need = packed_size(count, bits)
    if flat.numel() < need:
        raise ValueError(
            f"packed data holds {flat.numel()} bytes but {count} values of {bits} bits need {need}"
        )
    if bits == 8:
        return flat[:count].clone()
    if 8 % bits == 0:
        return _unpack_pow2(flat[:need], bits, count)
    blocks = (count + 7) // 8
    padded = torch.zeros(blocks * bits, dtype=torch.int64)
    padded[:need] = flat[:need].to(torch.int64)
    cols = padded.view(blocks, bits)
    words = cols[:, 0].clone()
    for j in range(1, bits):
        words |= cols[:, j] << (8 * j)
    values = torch.empty(blocks, 8, dtype=torch.uint8)
    for j in range(8):
        values[:, j] = (words >> (j * bits)) & (2**bits - 1)
    return values.reshape(-1)[:count].clone()


def _pack_pow2(flat: torch.Tensor, bits: int) -> torch.Tensor:
    """Fast path for 1, 2 and 4 bits: whole values per byte, bytewise shifts only."""
    per = 8 // bits
    count = flat.numel()
    padded = torch.zeros((count + per - 1) // per * per, dtype=torch.uint8)
    padded[:count] = flat
    cols = padded.view(-1, per)
    out = cols[:, 0].clone()
    for j in range(1, per):
        out |= cols[:, j] << (j * bits)
    return out


def _unpack_pow2(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    per = 8 // bits
    low = 2**bits - 1
    cols = [(packed >> (j * bits)) & low for j in range(per)]
    return torch.stack(cols, dim=1).reshape(-1)[:count]


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """Pack a boolean tensor (flattened) at one bit per element; True is a set bit."""
    if mask.dtype != torch.bool:
        raise TypeError(f"pack_mask needs a bool tensor, got {mask.dtype}")
    return pack_bits(mask.to(torch.uint8), 1)


def unpack_mask(packed: torch.Tensor, count: int) -> torch.Tensor:
    """Inverse of :func:`pack_mask`: a 1-D bool tensor of ``count`` elements."""
    return unpack_bits(packed, 1, count).to(torch.bool)
