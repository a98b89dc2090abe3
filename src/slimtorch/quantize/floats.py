"""Float-format weight quantizers: FP8 E4M3 per channel, MXFP4 and NVFP4 (pure functions).

Each takes a weight (any shape; its matrix view ``[out, in]`` is quantized, see
:func:`slimtorch.formats.state.to_matrix`) and returns a ``float`` :class:`QuantState` whose
values are exactly ``decode(codes) * scale / global_scale``:

* :func:`fp8_per_channel`: E4M3 codes, one float32 scale per output row,
  ``scale = amax(row) / 448`` (an all-zero row gets scale 1).
* :func:`mxfp4` (OCP Microscaling v1.0): blocks of 32 consecutive inputs of a row share one
  E8M0 scale ``X = 2 ** (floor(log2(amax(block))) - 2)`` (2 = the largest exponent of E2M1),
  elements ``E2M1(w / X)`` rounded to nearest even and clamped to +-6 (an all-zero block gets
  ``X = 1``). 4.25 bits per weight.
* :func:`nvfp4`: blocks of 16 share one E4M3 scale; a float32 per-tensor ``global_scale =
  6 * 448 / amax(w)`` (compressed-tensors' convention: the divisor, i.e. the reciprocal of
  ``amax / (6 * 448)``) lifts the block scales into E4M3's range:
  ``block = E4M3(amax(block) / 6 * global_scale)``, ``w ~ E2M1(w / (block / global_scale)) *
  block / global_scale``. 4.5 bits per weight (+ 4 bytes per tensor).

A last block shorter than the block size (``in`` not a multiple) is quantized on its own
columns. Masked (pruned) weights are zero and stay zero (code 0).
"""

from __future__ import annotations

import torch

from slimtorch.formats import floats
from slimtorch.formats.state import QuantState, from_matrix, to_matrix

MX_BLOCK = 32
NV_BLOCK = 16
_E2M1_EMAX = 2  # floor(log2(6))


def _check(w: torch.Tensor) -> torch.Tensor:
    if not bool(torch.isfinite(w).all()):
        raise ValueError("the weight holds NaN or Inf; float formats need finite weights")
    return to_matrix(w.detach().to(torch.float32))


def _blocks(m: torch.Tensor, size: int) -> torch.Tensor:
    """``[out, blocks, size]`` view of ``[out, in]`` with the last block zero-padded."""
    pad = -m.shape[1] % size
    if pad:
        m = torch.nn.functional.pad(m, (0, pad))
    return m.reshape(m.shape[0], -1, size)


def _state(
    codes: torch.Tensor, scale: torch.Tensor, shape: torch.Size, **fields: object
) -> QuantState:
    return QuantState(
        scheme="float",
        bits=8 if fields.get("element") == "e4m3" else 4,
        signed=True,
        codes=from_matrix(codes.contiguous(), shape),
        scale=scale.contiguous(),
        zero_point=torch.zeros(scale.shape, dtype=torch.int32),
        **fields,  # type: ignore[arg-type]
    )


def _apply_mask(m: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return m if mask is None else m * to_matrix(mask.to(m.dtype))


def fp8_per_channel(w: torch.Tensor, mask: torch.Tensor | None = None) -> QuantState:
    """E4M3 codes with one float32 scale per output row (``amax / 448``)."""
    m = _apply_mask(_check(w), mask)
    amax = m.abs().amax(dim=1, keepdim=True)
    scale = torch.where(amax > 0, amax / floats.E4M3_MAX, torch.ones_like(amax))
    codes = floats.encode_e4m3(m / scale)
    return _state(codes, scale, w.shape, granularity="per_channel", element="e4m3")


def mx_scale(amax: torch.Tensor) -> torch.Tensor:
    """The OCP MX shared scale of E2M1 blocks with max magnitudes ``amax``: ``2 **
    (floor(log2(amax)) - 2)`` clamped to E8M0's range, 1 for an all-zero block."""
    floors = floats.floor_log2(amax.clamp_min(torch.finfo(torch.float32).tiny))
    exponent = (floors - _E2M1_EMAX).clamp(-floats.E8M0_BIAS, floats.E8M0_BIAS)
    scale = torch.ldexp(torch.ones_like(amax), exponent)
    return torch.where(amax > 0, scale, torch.ones_like(amax))


def _fp4_codes(m: torch.Tensor, eff: torch.Tensor, size: int) -> torch.Tensor:
    """E2M1 codes of ``m`` (``[out, in]``) over per-block scales ``eff`` (``[out, blocks]``);
    a zero scale gives zero codes."""
    blocks = _blocks(m, size)
    safe = torch.where(eff > 0, eff, torch.ones_like(eff)).unsqueeze(-1)
    scaled = torch.where(eff.unsqueeze(-1) > 0, blocks / safe, torch.zeros_like(blocks))
    codes = floats.encode_e2m1(scaled).reshape(m.shape[0], -1)
    return codes[:, : m.shape[1]]


def mxfp4(w: torch.Tensor, mask: torch.Tensor | None = None, block: int = MX_BLOCK) -> QuantState:
    """MXFP4: E2M1 elements, one E8M0 scale per ``block`` inputs of a row (OCP MX)."""
    m = _apply_mask(_check(w), mask)
    scale = mx_scale(_blocks(m, block).abs().amax(dim=-1))
    codes = _fp4_codes(m, scale, block)
    return _state(
        codes,
        scale,
        w.shape,
        granularity="per_group",
        group_size=block,
        element="e2m1",
        scale_format="e8m0",
    )


def nvfp4_global_scale(amax: torch.Tensor) -> torch.Tensor:
    """float32 ``[1]``: ``6 * 448 / amax`` (1 when the tensor is all zero)."""
    amax = amax.to(torch.float32).reshape(1)
    top = torch.tensor([floats.E2M1_MAX * floats.E4M3_MAX], dtype=torch.float32)
    return torch.where(amax > 0, top / amax.clamp_min(torch.finfo(torch.float32).tiny), 1.0)


def nvfp4(w: torch.Tensor, mask: torch.Tensor | None = None, block: int = NV_BLOCK) -> QuantState:
    """NVFP4: E2M1 elements, one E4M3 scale per ``block`` inputs, a float32 tensor scale."""
    m = _apply_mask(_check(w), mask)
    glob = nvfp4_global_scale(m.abs().amax())
    amax = _blocks(m, block).abs().amax(dim=-1)
    scale = floats.decode_e4m3(floats.encode_e4m3(amax / floats.E2M1_MAX * glob))
    codes = _fp4_codes(m, scale / glob, block)
    return _state(
        codes,
        scale,
        w.shape,
        granularity="per_group",
        group_size=block,
        element="e2m1",
        scale_format="e4m3",
        global_scale=glob,
    )
