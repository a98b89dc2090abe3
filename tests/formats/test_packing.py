import math

import pytest
import torch

from slimtorch.formats.packing import (
    pack_bits,
    pack_mask,
    packed_size,
    unpack_bits,
    unpack_mask,
)

COUNTS = [0, 1, 2, 7, 8, 9, 13, 63, 64, 65, 1001]


@pytest.mark.parametrize("bits", range(1, 9))
def test_round_trip_all_bits_and_counts(bits: int) -> None:
    gen = torch.Generator().manual_seed(bits)
    for count in COUNTS:
        values = torch.randint(0, 2**bits, (count,), generator=gen).to(torch.uint8)
        packed = pack_bits(values, bits)
        assert packed.dtype == torch.uint8
        assert packed.numel() == math.ceil(count * bits / 8) == packed_size(count, bits)
        out = unpack_bits(packed, bits, count)
        assert out.dtype == torch.uint8
        assert torch.equal(out, values)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.int16, torch.int8, torch.uint32])
def test_any_integer_dtype_and_shape(dtype: torch.dtype) -> None:
    values = torch.arange(30).reshape(2, 3, 5) % 8
    packed = pack_bits(values.to(dtype), 3)
    assert torch.equal(unpack_bits(packed, 3, 30), values.reshape(-1).to(torch.uint8))


def test_bit_order_is_little_endian_stream() -> None:
    assert pack_bits(torch.tensor([1, 2]), 4).tolist() == [0x21]
    assert pack_bits(torch.tensor([1, 2, 3]), 2).tolist() == [0b111001]
    # 3 bits: 1 -> bits 0-2, 2 -> bits 3-5, 3 -> bits 6-8 (crosses into byte 1)
    assert pack_bits(torch.tensor([1, 2, 7]), 3).tolist() == [1 | 2 << 3 | (7 & 3) << 6, 1]
    mask = torch.tensor([True, False, False, False, False, False, False, False, True])
    assert pack_mask(mask).tolist() == [1, 1]


def test_unused_high_bits_are_zero() -> None:
    packed = pack_bits(torch.full((3,), 31), 5)  # 15 bits -> 2 bytes, top bit unused
    assert packed.tolist() == [255, 127]


def test_mask_round_trip() -> None:
    gen = torch.Generator().manual_seed(0)
    for count in COUNTS:
        mask = torch.rand(count, generator=gen) < 0.3
        packed = pack_mask(mask)
        assert packed.numel() == (count + 7) // 8
        assert torch.equal(unpack_mask(packed, count), mask)
    grid = torch.rand(4, 5, 3, generator=gen) < 0.5
    assert torch.equal(unpack_mask(pack_mask(grid), grid.numel()).reshape(grid.shape), grid)


def test_unpack_ignores_trailing_bytes() -> None:
    packed = torch.cat(
        [pack_bits(torch.tensor([5, 6, 7]), 3), torch.tensor([255], dtype=torch.uint8)]
    )
    assert unpack_bits(packed, 3, 3).tolist() == [5, 6, 7]


@pytest.mark.parametrize("bits", [0, 9, -1])
def test_bad_bits(bits: int) -> None:
    with pytest.raises(ValueError, match="bits must be"):
        pack_bits(torch.tensor([0]), bits)
    with pytest.raises(ValueError, match="bits must be"):
        unpack_bits(torch.tensor([0], dtype=torch.uint8), bits, 1)


def test_bad_values() -> None:
    with pytest.raises(ValueError, match=r"\[0, 15\]"):
        pack_bits(torch.tensor([16]), 4)
    with pytest.raises(ValueError, match=r"\[0, 3\]"):
        pack_bits(torch.tensor([-1, 0]), 2)
    with pytest.raises(TypeError, match="integer"):
        pack_bits(torch.tensor([0.5]), 4)
    with pytest.raises(TypeError, match="bool"):
        pack_mask(torch.tensor([1, 0]))


def test_bad_packed() -> None:
    with pytest.raises(ValueError, match="need 2"):
        unpack_bits(torch.zeros(1, dtype=torch.uint8), 3, 5)
    with pytest.raises(TypeError, match="uint8"):
        unpack_bits(torch.zeros(2, dtype=torch.int32), 3, 5)
    with pytest.raises(ValueError, match="count"):
        unpack_bits(torch.zeros(2, dtype=torch.uint8), 3, -1)


@pytest.mark.slow
@pytest.mark.parametrize("bits", [1, 3, 4, 8])
def test_large_round_trip(bits: int) -> None:
    gen = torch.Generator().manual_seed(1)
    values = torch.randint(0, 2**bits, (12_000_001,), generator=gen).to(torch.uint8)
    assert torch.equal(unpack_bits(pack_bits(values, bits), bits, values.numel()), values)
