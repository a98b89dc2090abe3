"""Bit codes of E4M3, E2M1 and E8M0 against the formats' definitions (exhaustive)."""

from __future__ import annotations

import pytest
import torch

from slimtorch.formats import floats


def _by_definition_e4m3(code: int) -> float:
    """OCP FP8 E4M3: sign, 4-bit exponent (bias 7), 3-bit mantissa, S.1111.111 NaN."""
    sign = -1.0 if code & 0x80 else 1.0
    exponent, mantissa = (code >> 3) & 0xF, code & 7
    if exponent == 0xF and mantissa == 7:
        return float("nan")
    if exponent == 0:
        return sign * mantissa / 8 * 2.0**-6
    return sign * (1 + mantissa / 8) * 2.0 ** (exponent - 7)


def _by_definition_e2m1(code: int) -> float:
    sign = -1.0 if code & 8 else 1.0
    exponent, mantissa = (code >> 1) & 3, code & 1
    if exponent == 0:
        return sign * mantissa * 0.5
    return sign * (1 + mantissa / 2) * 2.0 ** (exponent - 1)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal values with equal signs of zero, NaN where the other has NaN."""
    nan = torch.isnan(a)
    return (
        torch.equal(nan, torch.isnan(b))
        and torch.equal(torch.signbit(a[~nan]), torch.signbit(b[~nan]))
        and torch.equal(a[~nan], b[~nan])
    )


def test_e4m3_every_code_decodes_by_definition_and_like_torch() -> None:
    codes = torch.arange(256)
    values = floats.decode_e4m3(codes)
    expected = torch.tensor([_by_definition_e4m3(c) for c in range(256)], dtype=torch.float32)
    assert _same(values, expected)
    torch_values = codes.to(torch.uint8).view(torch.float8_e4m3fn).to(torch.float32)
    assert _same(values, torch_values)
    assert float(values[0x7E]) == 448.0 and float(values[1]) == 2.0**-9
    assert int(torch.isnan(values).sum()) == 2  # 0x7F and 0xFF


def test_e4m3_every_code_reencodes_to_itself() -> None:
    codes = torch.arange(256).to(torch.uint8)
    back = floats.encode_e4m3(floats.decode_e4m3(codes))
    assert torch.equal(back[codes != 0xFF], codes[codes != 0xFF])
    assert int(back[0xFF]) == floats.E4M3_NAN  # NaN has one code (sign dropped)


def test_e4m3_rounding_ties_to_even_and_matches_torch_cast() -> None:
    pos = floats.decode_e4m3(torch.arange(127))
    mids = (pos[1:] + pos[:-1]) / 2
    codes = floats.encode_e4m3(mids)
    even = torch.where(torch.arange(126) % 2 == 0, torch.arange(126), torch.arange(1, 127))
    assert torch.equal(codes.to(torch.int64), even)  # every tie goes to the even code
    # just above / below each midpoint: the upper / lower neighbour
    up = floats.encode_e4m3(torch.nextafter(mids, torch.full_like(mids, 1e9)))
    down = floats.encode_e4m3(torch.nextafter(mids, torch.zeros_like(mids)))
    assert torch.equal(up.to(torch.int64), torch.arange(1, 127))
    assert torch.equal(down.to(torch.int64), torch.arange(126))
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(20000, generator=g) * 50, mids, -mids, torch.tensor([0.0, -0.0])])
    x = x[x.abs() <= 448]
    assert torch.equal(floats.encode_e4m3(x), x.to(torch.float8_e4m3fn).view(torch.uint8))


def test_e4m3_saturates_and_keeps_nan() -> None:
    x = torch.tensor([460.0, 1e9, float("inf"), -1e9, float("nan"), 1e-30, -1e-30])
    codes = floats.encode_e4m3(x).tolist()
    assert codes == [0x7E, 0x7E, 0x7E, 0xFE, 0x7F, 0x00, 0x80]


def test_e2m1_every_code_and_ties() -> None:
    codes = torch.arange(16)
    values = floats.decode_e2m1(codes)
    expected = torch.tensor([_by_definition_e2m1(c) for c in range(16)], dtype=torch.float32)
    assert _same(values, expected)
    assert values[:8].tolist() == [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    assert torch.equal(floats.encode_e2m1(values), codes.to(torch.uint8))
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    assert floats.encode_e2m1(ties).tolist() == [0, 2, 2, 4, 4, 6, 6]  # to the even code
    assert floats.encode_e2m1(-ties).tolist() == [8, 10, 10, 12, 12, 14, 14]
    above = floats.encode_e2m1(torch.nextafter(ties, torch.full_like(ties, 10.0)))
    assert above.tolist() == [1, 2, 3, 4, 5, 6, 7]
    assert floats.encode_e2m1(torch.tensor([6.5, 100.0, -7.0])).tolist() == [7, 7, 15]
    with pytest.raises(ValueError, match="NaN"):
        floats.encode_e2m1(torch.tensor([float("nan")]))


def test_e8m0_codes() -> None:
    codes = torch.arange(256)
    values = floats.decode_e8m0(codes)
    assert torch.isnan(values[255]) and not bool(torch.isnan(values[:255]).any())
    assert torch.equal(values[:255], torch.pow(2.0, codes[:255].to(torch.float64) - 127).float())
    assert torch.equal(floats.encode_e8m0(values), codes.to(torch.uint8))
    with pytest.raises(ValueError, match="powers of two"):
        floats.encode_e8m0(torch.tensor([3.0]))
    with pytest.raises(ValueError, match="powers of two"):
        floats.encode_e8m0(torch.tensor([2.0**-130]))


def test_floor_log2_is_exact_at_powers_of_two() -> None:
    x = torch.tensor([1.0, 2.0, 4.0, 0.5, 3.999, 2.0**-140, 6.0, 2.0**127])
    assert floats.floor_log2(x).tolist() == [0, 1, 2, -1, 1, -140, 2, 127]
    with pytest.raises(ValueError, match="element"):
        floats.decode(torch.zeros(1, dtype=torch.uint8), "e3m2")
