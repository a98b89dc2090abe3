"""Bit codes of the small float formats: FP8 E4M3, FP4 E2M1 and the E8M0 scale.

Pure functions over tensors, exact by construction (every value and every rounding midpoint of
these formats is a float32):

* **E4M3** (OCP FP8, ``torch.float8_e4m3fn``): 1 sign, 4 exponent (bias 7), 3 mantissa bits;
  no infinities, ``S.1111.111`` is NaN, largest finite 448, smallest subnormal ``2**-9``.
* **E2M1** (OCP MX FP4): 1 sign, 2 exponent (bias 1), 1 mantissa bit; magnitudes
  ``{0, 0.5, 1, 1.5, 2, 3, 4, 6}`` in codes 0..7, bit 3 the sign; no NaN, no infinity.
* **E8M0** (OCP MX scale): an unsigned biased exponent, ``2 ** (code - 127)``; 255 is NaN.

Encoding rounds to the nearest representable value, ties to the even code (the one whose
mantissa's last bit is 0), and saturates: magnitudes past the largest finite value become it
(the ``satfinite`` conversion; torch's own cast makes them NaN). The sign of the input is kept,
so ``-0.0`` and negative values that round to zero encode as negative zero. NaN encodes as the
format's NaN (E4M3) or raises (E2M1 has none).
"""

from __future__ import annotations

from functools import cache

import torch

E4M3_MAX = 448.0
E2M1_MAX = 6.0
E4M3_NAN = 0x7F
E8M0_NAN = 0xFF
E8M0_BIAS = 127
E2M1_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


@cache
def _e4m3_magnitudes() -> tuple[float, ...]:
    """The 127 finite non-negative E4M3 values, codes 0..126, in increasing order."""
    values = []
    for code in range(127):
        exponent, mantissa = code >> 3, code & 7
        if exponent == 0:
            values.append(mantissa / 8 * 2.0**-6)
        else:
            values.append((1 + mantissa / 8) * 2.0 ** (exponent - 7))
    return tuple(values)


def _table(bits: int) -> torch.Tensor:
    """float32 value of every code of the 8-bit (E4M3) or 4-bit (E2M1) format."""
    mags = (*_e4m3_magnitudes(), float("nan")) if bits == 8 else E2M1_MAGNITUDES
    pos = torch.tensor(mags, dtype=torch.float32)
    return torch.cat([pos, -pos])


def decode_e4m3(codes: torch.Tensor) -> torch.Tensor:
    """float32 values of E4M3 bit codes (any integer tensor with values 0..255)."""
    return _table(8).to(codes.device)[codes.to(torch.int64)]


def decode_e2m1(codes: torch.Tensor) -> torch.Tensor:
    """float32 values of E2M1 bit codes (values 0..15)."""
    return _table(4).to(codes.device)[codes.to(torch.int64)]


def _round_magnitude(a: torch.Tensor, mags: tuple[float, ...]) -> torch.Tensor:
    """Index of the nearest of the sorted ``mags`` to ``a >= 0`` (float32), ties to the even
    index, saturating at the last."""
    grid = torch.tensor(mags, dtype=torch.float32, device=a.device)
    mids = (grid[1:] + grid[:-1]) / 2  # exact: one more mantissa bit than the format has
    idx = torch.searchsorted(mids, a.contiguous(), right=False)  # mids[idx-1] < a <= mids[idx]
    tie = (idx < mids.numel()) & (a == mids[idx.clamp(max=mids.numel() - 1)])
    return torch.where(tie & (idx % 2 == 1), idx + 1, idx)


def _encode(x: torch.Tensor, mags: tuple[float, ...]) -> torch.Tensor:
    x = x.to(torch.float32)
    sign = torch.signbit(x).to(torch.int64) << (3 if len(mags) == 8 else 7)
    mag = _round_magnitude(x.abs().nan_to_num(nan=0.0), mags)
    return (mag | sign).to(torch.uint8)


def encode_e4m3(x: torch.Tensor) -> torch.Tensor:
    """uint8 E4M3 codes of ``x`` (round to nearest even, saturating at +-448, NaN to 0x7F)."""
    codes = _encode(x, _e4m3_magnitudes())
    return torch.where(torch.isnan(x), torch.full_like(codes, E4M3_NAN), codes)


def encode_e2m1(x: torch.Tensor) -> torch.Tensor:
    """uint8 E2M1 codes (0..15) of ``x`` (round to nearest even, saturating at +-6)."""
    if bool(torch.isnan(x).any()):
        raise ValueError("E2M1 has no NaN: the values to encode hold NaN")
    return _encode(x, E2M1_MAGNITUDES)


def decode_e8m0(codes: torch.Tensor) -> torch.Tensor:
    """float32 scales ``2 ** (code - 127)`` of E8M0 codes; 255 decodes to NaN."""
    c = codes.to(torch.int32)
    value = torch.ldexp(torch.ones_like(c, dtype=torch.float32), c - E8M0_BIAS)
    return torch.where(c == E8M0_NAN, torch.full_like(value, float("nan")), value)


def encode_e8m0(scale: torch.Tensor) -> torch.Tensor:
    """uint8 E8M0 codes of power-of-two float32 scales in ``[2**-127, 2**127]`` (NaN to 255);
    a ValueError for any other value (E8M0 holds powers of two only)."""
    s = scale.to(torch.float32)
    finite = ~torch.isnan(s)
    mantissa, exponent = torch.frexp(torch.where(finite, s, torch.ones_like(s)))
    codes = exponent.to(torch.int32) - 1 + E8M0_BIAS  # s = 0.5 * 2**exponent
    bad = finite & ((mantissa != 0.5) | (codes < 0) | (codes > 254))
    if bool(bad.any()):
        raise ValueError(f"E8M0 holds the powers of two 2**-127..2**127, got {float(s[bad][0])!r}")
    return torch.where(finite, codes, torch.full_like(codes, E8M0_NAN)).to(torch.uint8)


def floor_log2(x: torch.Tensor) -> torch.Tensor:
    """``floor(log2(x))`` of positive float32 values, exactly (int32; from the exponent bits,
    so a power of two gives its own exponent, not one below through a rounded log)."""
    _, exponent = torch.frexp(x.to(torch.float32))
    return exponent.to(torch.int32) - 1


def decode(codes: torch.Tensor, element: str) -> torch.Tensor:
    """float32 values of ``codes`` in ``element`` format (``"e4m3"`` or ``"e2m1"``)."""
    if element == "e4m3":
        return decode_e4m3(codes)
    if element == "e2m1":
        return decode_e2m1(codes)
    raise ValueError(f"unknown float element format {element!r}; use 'e4m3' or 'e2m1'")


def encode(x: torch.Tensor, element: str) -> torch.Tensor:
    """uint8 codes of ``x`` in ``element`` format (``"e4m3"`` or ``"e2m1"``)."""
    if element == "e4m3":
        return encode_e4m3(x)
    if element == "e2m1":
        return encode_e2m1(x)
    raise ValueError(f"unknown float element format {element!r}; use 'e4m3' or 'e2m1'")
