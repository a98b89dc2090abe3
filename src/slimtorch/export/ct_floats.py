"""The compressed-tensors layouts of float-quantized Linear layers (FP8, NVFP4, MXFP4).

What vLLM and transformers (with the compressed-tensors package, 0.20) read:

* FP8 E4M3 per output channel, format ``float-quantized`` (the naive compressor): ``weight``
  ``float8_e4m3fn [out, in]`` (the codes' bit patterns) and ``weight_scale`` float32
  ``[out, 1]``; the reader computes ``weight.to(float32) * weight_scale``. An
  :class:`~slimtorch.runtime.Fp8Linear` with ``activations="dynamic"`` adds
  ``input_activations``: float 8-bit, ``token`` strategy, dynamic (``FP8_DYNAMIC``).
* NVFP4, format ``nvfp4-pack-quantized``: ``weight_packed`` uint8 ``[out, in / 2]`` (E2M1 codes,
  column ``2j`` in the low nibble, ``2j + 1`` in the high one), ``weight_scale``
  ``float8_e4m3fn [out, in / 16]``, ``weight_global_scale`` float32 ``[1]``; the reader
  computes ``e2m1 * (weight_scale / weight_global_scale)`` (strategy ``tensor_group``).
* MXFP4, format ``mxfp4-pack-quantized``: ``weight_packed`` as NVFP4's, ``weight_scale``
  uint8 ``[out, in / 32]`` (E8M0 exponents), strategy ``group``, ``scale_dtype`` uint8.

Both FP4 readers decompress in bfloat16 (``unpack_fp4_from_uint8``'s default): MXFP4's values
are exact there, NVFP4's are rounded to bfloat16 (a float32 model reloads NVFP4 weights as
``bfloat16(slimtorch's)``; a bfloat16 model reloads them bit-identical).
"""

from __future__ import annotations

from typing import Any

import torch

from slimtorch.core.errors import UnsupportedModelError
from slimtorch.formats import floats
from slimtorch.formats.state import QuantState, to_matrix

FP8_FORMAT = "float-quantized"
NVFP4_FORMAT = "nvfp4-pack-quantized"
MXFP4_FORMAT = "mxfp4-pack-quantized"
INSTEAD = "export it with --to hf (dense weights) or keep it as a slimtorch artifact"


def float_layout(where: str, q: QuantState, in_features: int) -> tuple[str, str, int | None]:
    """``(format, strategy, group_size)`` of a float state, or why it has none."""
    if q.element == "e4m3" and q.granularity == "per_channel" and q.global_scale is None:
        return FP8_FORMAT, "channel", None
    size = q.group_size
    if q.element == "e2m1" and q.granularity == "per_group" and size in (16, 32):
        known: dict[tuple[int, str | None], str] = {
            (16, "e4m3"): NVFP4_FORMAT,
            (32, "e8m0"): MXFP4_FORMAT,
        }
        fmt = known.get((size, q.scale_format))
        if fmt == NVFP4_FORMAT and q.global_scale is None:
            fmt = None
        if fmt is not None:
            if in_features % size:
                raise UnsupportedModelError(
                    f"{where} has {in_features} input features, not a multiple of its block"
                    f" size {size}: compressed-tensors needs whole blocks; leave the layer dense"
                    f" (add it to the stage's ignore) or {INSTEAD}"
                )
            return fmt, "tensor_group" if fmt == NVFP4_FORMAT else "group", size
    raise UnsupportedModelError(
        f"{where} holds float codes compressed-tensors has no layout for ({q.element}, "
        f"{q.granularity}, block {size}, {q.scale_format} scales); compressed-tensors stores FP8"
        f" per channel (quantize.fp8), NVFP4 (quantize.nvfp4) and MXFP4 (quantize.mxfp4): use"
        f" one of those or {INSTEAD}"
    )


def float_codes(q: QuantState, mask: torch.Tensor | None) -> torch.Tensor:
    """uint8 codes ``[out, in]``; pruned positions get code 0 (+0.0)."""
    codes = to_matrix(q.codes).to(torch.uint8)
    if mask is not None:
        codes = torch.where(to_matrix(mask), codes, torch.zeros_like(codes))
    return codes


def pack_fp4(codes: torch.Tensor) -> torch.Tensor:
    """Two E2M1 codes per byte along the rows: column ``2j`` low nibble, ``2j + 1`` high."""
    rows, cols = codes.shape
    if cols % 2:
        raise UnsupportedModelError(f"FP4 packing needs an even number of columns, got {cols}")
    pairs = codes.to(torch.uint8).reshape(rows, cols // 2, 2)
    return (pairs[..., 0] | (pairs[..., 1] << 4)).contiguous()


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_fp4`: uint8 codes ``[rows, 2 * cols]``."""
    low, high = packed & 0x0F, packed >> 4
    return torch.stack([low, high], dim=-1).reshape(packed.shape[0], -1)


def float_tensors(q: QuantState, codes: torch.Tensor, fmt: str) -> dict[str, torch.Tensor]:
    """The tensors of one float-quantized Linear, by their name under the layer."""
    scale = q.scale.to(torch.float32)
    if fmt == FP8_FORMAT:
        return {
            "weight": codes.contiguous().view(torch.float8_e4m3fn),
            "weight_scale": scale.reshape(-1, 1).contiguous(),
        }
    out = {"weight_packed": pack_fp4(codes)}
    if fmt == NVFP4_FORMAT:
        assert q.global_scale is not None
        out["weight_scale"] = floats.encode_e4m3(scale).view(torch.float8_e4m3fn).contiguous()
        out["weight_global_scale"] = q.global_scale.to(torch.float32).reshape(1).clone()
    else:
        out["weight_scale"] = floats.encode_e8m0(scale).contiguous()
    return out


def float_scheme(fmt: str, strategy: str, group_size: int | None, dynamic: bool) -> dict[str, Any]:
    """The ``config_groups`` entry (without targets) of one float layout."""
    bits = 8 if fmt == FP8_FORMAT else 4
    weights: dict[str, Any] = {"num_bits": bits, "type": "float", "symmetric": True}
    weights |= {"strategy": strategy, "group_size": group_size, "dynamic": False}
    if fmt == NVFP4_FORMAT:
        weights["scale_dtype"] = "torch.float8_e4m3fn"
    elif fmt == MXFP4_FORMAT:
        weights["scale_dtype"] = "torch.uint8"
    inputs = None
    if dynamic:
        inputs = {"num_bits": 8, "type": "float", "symmetric": True, "group_size": None}
        inputs |= {"strategy": "token", "dynamic": True}
    return {
        "weights": weights,
        "input_activations": inputs,
        "output_activations": None,
        "format": fmt,
    }
