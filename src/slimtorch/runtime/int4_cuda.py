"""The CUDA side of :class:`~slimtorch.runtime.int4.Int4WeightOnlyLinear`: torch's tinygemm int4
kernel, ``torch.ops.aten._weight_int4pack_mm(x_bf16, packed, group, scales_and_zeros)``.

It shares the CPU kernel's arithmetic (``w = (code - 8) * scale + zero``, ``scales_and_zeros``
``[K / group, N, 2]`` bfloat16, a group of 32..256, ``N`` padded to a multiple of 16) but not its
packing: ``_convert_weight_to_int4pack(uint8 [N, K / 2], inner_k_tiles)`` takes two codes a byte
with the *even* column in the *high* nibble (the CPU variant takes int32 codes), and returns an
int32 ``[N / 8, K / (16 * inner_k_tiles), 32, inner_k_tiles / 2]`` tile layout. ``inner_k_tiles``
is 2, 4 or 8 and needs ``K % (16 * inner_k_tiles) == 0``: the largest that divides ``K`` is used
(``K`` is already a whole number of groups, so a multiple of 32). The kernel needs compute
capability 8.0 (see :mod:`slimtorch.runtime.device`).

The packing and the tile choice are plain tensor code, tested on CPU against
:func:`reference_matmul`, which computes what the kernel computes from the same inputs.
"""

from __future__ import annotations

import torch
from torch import Tensor

INNER_K_TILES = (8, 4, 2)


def inner_k_tiles(k: int) -> int:
    """The largest ``inner_k_tiles`` the kernel accepts for ``k`` (padded) input features."""
    for tiles in INNER_K_TILES:
        if k % (16 * tiles) == 0:
            return tiles
    raise ValueError(f"the CUDA int4 kernel needs in_features padded to a multiple of 32, got {k}")


def pack_uint8_cuda(codes: Tensor) -> Tensor:
    """``uint8 [N, K / 2]``: int codes 0..15 ``[N, K]`` (``K`` even), the even column in the
    high nibble, as ``_convert_weight_to_int4pack`` reads them."""
    if codes.dim() != 2 or codes.shape[1] % 2:
        raise ValueError(f"codes must be [N, K] with K even, got {tuple(codes.shape)}")
    c = codes.to(torch.int32)
    return ((c[:, 0::2] << 4) | c[:, 1::2]).to(torch.uint8)


def unpack_uint8_cuda(packed: Tensor) -> Tensor:
    """Inverse of :func:`pack_uint8_cuda`: int32 codes ``[N, K]``."""
    p = packed.to(torch.int32)
    return torch.stack([p >> 4, p & 0x0F], dim=-1).reshape(packed.shape[0], -1)


def convert_cuda(codes: Tensor) -> Tensor:
    """The kernel's packed weight from padded int codes ``[N, K]`` on a CUDA device."""
    tiles = inner_k_tiles(codes.shape[1])
    packed = pack_uint8_cuda(codes).contiguous()
    return torch.ops.aten._convert_weight_to_int4pack(packed, tiles)


def matmul_cuda(x: Tensor, packed: Tensor, group: int, scales_and_zeros: Tensor) -> Tensor:
    """``x`` (bfloat16 ``[M, K]``) times the packed weight: bfloat16 ``[M, N]``."""
    return torch.ops.aten._weight_int4pack_mm(x, packed, group, scales_and_zeros)


def reference_matmul(
    x: Tensor, packed_uint8: Tensor, group: int, scales_and_zeros: Tensor
) -> Tensor:
    """What the kernel computes, in float32, from the ``uint8`` packing of
    :func:`pack_uint8_cuda`: ``x @ ((code - 8) * scale + zero)^T``."""
    codes = unpack_uint8_cuda(packed_uint8).to(torch.float32)
    sz = scales_and_zeros.to(torch.float32)  # [K / group, N, 2]
    scale = sz[..., 0].t().repeat_interleave(group, dim=1)
    zero = sz[..., 1].t().repeat_interleave(group, dim=1)
    weight = (codes - 8.0) * scale + zero
    return x.to(torch.float32) @ weight.t()
