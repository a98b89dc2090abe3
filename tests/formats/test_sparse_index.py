import numpy as np
import pytest
import torch

from slimtorch.formats.huffman import huffman_decode, huffman_encode
from slimtorch.formats.packing import pack_bits, packed_size, unpack_bits
from slimtorch.formats.sparse_index import (
    best_gap_bits,
    csr_decode,
    csr_encode,
    gap_decode,
    gap_encode,
    gap_sizes,
    gap_symbol_count,
)

DENSITIES = [0.0, 1e-4, 0.08, 0.5, 1.0]


def _mask(numel: int, density: float, seed: int, runs: bool = False) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(numel, generator=gen) < density
    if runs and numel > 10:
        # long empty and full stretches (pruned rows, dense blocks)
        mask[numel // 10 : numel // 2] = False
        mask[numel // 2 : numel // 2 + numel // 20] = True
    return mask


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("density", DENSITIES)
def test_gap_round_trip(bits: int, density: float) -> None:
    for numel in (0, 1, 2, 255, 256, 20_011):
        for runs in (False, True):
            mask = _mask(numel, density, seed=numel + bits, runs=runs)
            symbols = gap_encode(mask, bits)
            assert symbols.dtype == torch.uint8
            assert int(symbols.max()) <= 2**bits - 1 if symbols.numel() else True
            assert symbols.numel() == gap_symbol_count(mask, bits)
            assert int((symbols != 0).sum()) == int(mask.sum())  # fillers need no weight slot
            assert torch.equal(gap_decode(symbols, bits, numel), mask)
            packed = pack_bits(symbols, bits)
            assert gap_sizes(mask)[bits] == packed.numel()
            back = unpack_bits(packed, bits, symbols.numel())
            assert torch.equal(gap_decode(back, bits, numel), mask)


@pytest.mark.parametrize("bits", range(1, 9))
def test_filler_counts(bits: int) -> None:
    m = 2**bits - 1
    expected = {1: [1], m: [m], m + 1: [0, 1], 2 * m: [0, m], 2 * m + 1: [0, 0, 1]}
    for gap, symbols in expected.items():
        mask = torch.zeros(3 * m + 2, dtype=torch.bool)
        mask[gap - 1] = True  # the first gap is counted from position -1
        assert gap_encode(mask, bits).tolist() == symbols
        assert gap_symbol_count(mask, bits) == len(symbols)
    mask = torch.zeros(4 * m, dtype=torch.bool)
    mask[[0, m + 1]] = True  # gaps 1 and m + 1, trailing zeros need nothing
    assert gap_encode(mask, bits).tolist() == [1, 0, 1]


def test_gap_encode_reads_any_shape() -> None:
    mask = _mask(600, 0.1, seed=1).reshape(20, 30)
    assert torch.equal(gap_decode(gap_encode(mask, 4), 4, 600), mask.reshape(-1))


def test_best_gap_bits_is_the_smallest() -> None:
    for density in (1e-3, 0.08, 0.5, 0.95):
        mask = _mask(50_000, density, seed=2)
        sizes = {b: packed_size(gap_encode(mask, b).numel(), b) for b in range(1, 9)}
        best = best_gap_bits(mask)
        assert sizes[best] == min(sizes.values())
        assert gap_sizes(mask) == sizes
    assert best_gap_bits(_mask(50_000, 0.95, seed=2)) == 1
    assert best_gap_bits(_mask(50_000, 1e-3, seed=2)) == 8


def test_gap_symbols_huffman_round_trip() -> None:
    mask = _mask(200_000, 0.08, seed=4)
    symbols = gap_encode(mask, 5)
    parts = huffman_encode(symbols, 32)
    assert 8 * parts["stream"].numel() < 0.96 * 5 * symbols.numel()
    decoded = huffman_decode(parts, symbols.numel())
    assert torch.equal(gap_decode(decoded, 5, mask.numel()), mask)


def test_gap_decode_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="outside"):
        gap_decode(torch.tensor([1, 8], dtype=torch.uint8), 3, 100)
    with pytest.raises(ValueError, match="filler"):
        gap_decode(torch.tensor([1, 0], dtype=torch.uint8), 3, 100)
    with pytest.raises(ValueError, match="past numel"):
        gap_decode(torch.tensor([7, 7, 3], dtype=torch.uint8), 3, 16)
    assert gap_decode(torch.tensor([7, 7, 2], dtype=torch.uint8), 3, 16)[15]
    with pytest.raises(ValueError, match="past numel"):
        gap_decode(torch.tensor([0, 1], dtype=torch.uint8), 1, 1)
    with pytest.raises(ValueError, match="integer"):
        gap_decode(torch.tensor([1.0]), 3, 10)
    with pytest.raises(ValueError, match="bits"):
        gap_encode(torch.ones(3, dtype=torch.bool), 9)
    with pytest.raises(ValueError, match="bits"):
        gap_decode(torch.tensor([1], dtype=torch.uint8), 0, 3)
    with pytest.raises(TypeError, match="bool"):
        gap_encode(torch.ones(3), 4)


@pytest.mark.parametrize(
    ("rows", "cols", "col_dtype"),
    [(0, 5, torch.uint8), (5, 0, torch.uint8), (1, 1, torch.uint8), (7, 256, torch.uint8),
     (9, 300, torch.int16), (3, 40_000, torch.int32)],
)  # fmt: skip
def test_csr_round_trip(rows: int, cols: int, col_dtype: torch.dtype) -> None:
    for density in DENSITIES:
        mask = _mask(rows * cols, density, seed=rows + cols).reshape(rows, cols)
        parts = csr_encode(mask)
        assert set(parts) == {"row_ptr", "col_idx"}
        assert parts["col_idx"].dtype == col_dtype
        assert parts["col_idx"].numel() == int(mask.sum())
        assert parts["row_ptr"].numel() == rows + 1
        assert torch.equal(csr_decode(parts, rows, cols), mask)


def test_csr_row_ptr_dtype() -> None:
    assert csr_encode(torch.ones(2, 100, dtype=torch.bool))["row_ptr"].dtype == torch.uint8
    assert csr_encode(torch.ones(2, 200, dtype=torch.bool))["row_ptr"].dtype == torch.int16
    big = torch.ones(2, 20_000, dtype=torch.bool)
    assert csr_encode(big)["row_ptr"].dtype == torch.int32
    assert csr_encode(big)["row_ptr"].tolist() == [0, 20_000, 40_000]


def test_csr_decode_rejects_bad_parts() -> None:
    mask = torch.tensor([[1, 0, 1, 0], [0, 0, 0, 0], [0, 1, 1, 1]], dtype=torch.bool)
    parts = csr_encode(mask)
    assert parts["row_ptr"].tolist() == [0, 2, 2, 5]
    assert parts["col_idx"].tolist() == [0, 2, 1, 2, 3]
    col = parts["col_idx"]

    def bad(**change: list[int]) -> dict[str, torch.Tensor]:
        out = dict(parts)
        for key, values in change.items():
            out[key] = torch.tensor(values, dtype=parts[key].dtype)
        return out

    cases = [
        (bad(row_ptr=[0, 2, 5]), "rows \\+ 1"),
        (bad(row_ptr=[1, 2, 2, 5]), "start at 0"),
        (bad(row_ptr=[0, 3, 2, 5]), "never decrease"),
        (bad(row_ptr=[0, 2, 2, 4]), "end at"),
        (bad(col_idx=[0, 2, 1, 2, 4]), "not \\[0, 4\\)"),
        (bad(col_idx=[0, 2, 1, 1, 3]), "strictly"),
        (bad(col_idx=[2, 0, 1, 2, 3]), "strictly"),
        ({"row_ptr": parts["row_ptr"]}, "lack 'col_idx'"),
        (dict(parts, col_idx=col.float()), "integer"),
    ]
    for broken, message in cases:
        with pytest.raises(ValueError, match=message):
            csr_decode(broken, 3, 4)
    assert torch.equal(
        csr_decode(bad(col_idx=[0, 2, 0, 2, 3]), 3, 4)[2], torch.tensor([1, 0, 1, 1]).bool()
    )
    with pytest.raises(ValueError, match="2-D bool"):
        csr_encode(torch.ones(4, dtype=torch.bool))


def test_gap_encode_matches_reference_loop() -> None:
    mask = _mask(3000, 0.02, seed=9)
    for bits in (2, 3, 5):
        m, prev, ref = 2**bits - 1, -1, []
        for pos in np.flatnonzero(mask.numpy()).tolist():
            gap = pos - prev
            while gap > m:
                ref.append(0)
                gap -= m
            ref.append(gap)
            prev = pos
        assert gap_encode(mask, bits).tolist() == ref
