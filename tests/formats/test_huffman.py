import heapq
import math

import numpy as np
import pytest
import torch

from slimtorch.formats.huffman import (
    CHUNK,
    MAX_LEN,
    canonical_codes,
    code_lengths,
    coded_bits,
    entropy_bits,
    huffman_bits,
    huffman_decode,
    huffman_encode,
    payload_bits,
)


def _round_trip(symbols: torch.Tensor, alphabet: int, chunk: int = CHUNK) -> dict:
    parts = huffman_encode(symbols, alphabet, chunk=chunk)
    assert parts["lengths"].dtype == torch.uint8 and parts["lengths"].numel() == alphabet
    assert parts["stream"].dtype == torch.uint8
    out = huffman_decode(parts, symbols.numel(), chunk=chunk)
    assert out.dtype == torch.int64
    assert torch.equal(out, symbols.to(torch.int64))
    return parts


def _peaked(count: int, seed: int = 0) -> torch.Tensor:
    """5-bit codebook indices of a Gaussian weight in 32 linear bins."""
    w = torch.randn(count, generator=torch.Generator().manual_seed(seed))
    idx = ((w - w.min()) / (w.max() - w.min()) * 32).long()
    return idx.clamp(0, 31)


def _huffman_cost(freqs: list[int]) -> int:
    """Reference: total bits of an unrestricted Huffman code (sum of merged weights)."""
    heap = [f for f in freqs if f > 0]
    if len(heap) == 1:
        return heap[0]
    heapq.heapify(heap)
    cost = 0
    while len(heap) > 1:
        a, b = heapq.heappop(heap), heapq.heappop(heap)
        cost += a + b
        heapq.heappush(heap, a + b)
    return cost


@pytest.mark.parametrize("alphabet", [1, 2, 3, 32, 256])
@pytest.mark.parametrize("count", [0, 1, 2, 7, 4095, 4096, 4097, 3 * 4096 + 5])
def test_round_trip_random(alphabet: int, count: int) -> None:
    gen = torch.Generator().manual_seed(alphabet * 100003 + count)
    symbols = torch.randint(0, alphabet, (count,), generator=gen)
    parts = _round_trip(symbols, alphabet)
    assert ("offsets" in parts) == (count > CHUNK)
    if "offsets" in parts:
        assert parts["offsets"].dtype == torch.int32
        assert parts["offsets"].numel() == math.ceil(count / CHUNK)


@pytest.mark.parametrize("chunk", [1, 3, 64, 1000])
def test_round_trip_small_chunks(chunk: int) -> None:
    symbols = _peaked(5000, seed=chunk)
    parts = _round_trip(symbols, 32, chunk=chunk)
    assert parts["offsets"].numel() == math.ceil(5000 / chunk)


def test_degenerate_alphabets() -> None:
    one = torch.full((1000,), 200, dtype=torch.uint8)
    parts = _round_trip(one, 256)
    assert parts["lengths"].nonzero().flatten().tolist() == [200]
    assert int(parts["lengths"][200]) == 1 and payload_bits(parts) == 1000
    two = torch.tensor([3, 9] * 50 + [3] * 7)
    parts = _round_trip(two, 10)
    assert parts["lengths"][[3, 9]].tolist() == [1, 1]
    uniform = torch.arange(256).repeat(40)
    parts = _round_trip(uniform, 256)
    assert parts["lengths"].unique().tolist() == [8]
    assert payload_bits(parts) == 8 * uniform.numel()
    _round_trip(torch.zeros(5, dtype=torch.int64), 1)


def test_accepts_numpy_and_any_int_dtype() -> None:
    values = np.array([0, 1, 1, 2, 2, 2], dtype=np.uint8)
    parts = huffman_encode(values, 3)
    assert huffman_decode(parts, 6).tolist() == values.tolist()


def test_canonical_codes_match_deflate_example() -> None:
    # RFC 1951 section 3.2.2: lengths (3, 3, 3, 3, 3, 2, 4, 4)
    codes = canonical_codes(np.array([3, 3, 3, 3, 3, 2, 4, 4], dtype=np.uint8))
    assert codes.tolist() == [0b010, 0b011, 0b100, 0b101, 0b110, 0b00, 0b1110, 0b1111]


def test_bit_order_is_msb_first() -> None:
    parts = huffman_encode(torch.tensor([0, 1, 1, 0, 1]), 2)
    assert parts["stream"].tolist() == [0b01101000]


def test_lengths_are_optimal_without_limit() -> None:
    rng = np.random.default_rng(0)
    for size in (2, 3, 17, 256):
        freqs = rng.integers(0, 1000, size)
        freqs[0] = 1
        lengths = code_lengths(freqs).astype(np.int64)
        assert int((freqs * lengths).sum()) == _huffman_cost(freqs.tolist())
        assert bool(((freqs > 0) == (lengths > 0)).all())
        assert sum(2.0 ** -int(n) for n in lengths if n) == 1.0


def test_length_limit_on_fibonacci_frequencies() -> None:
    fib = [1, 1]
    while len(fib) < 30:
        fib.append(fib[-1] + fib[-2])
    freqs = np.array(fib)
    assert int(code_lengths(freqs).max()) == MAX_LEN  # unrestricted Huffman would need 29
    for limit in (5, 8, 12):
        lengths = code_lengths(freqs, limit).astype(np.int64)
        assert int(lengths.max()) == limit
        assert sum(2.0 ** -int(n) for n in lengths) == 1.0  # complete code
        # within the limit, no code is shorter: at least the unrestricted optimum
        assert int((freqs * lengths).sum()) >= _huffman_cost(fib)
    tight = code_lengths(np.ones(32, dtype=np.int64), 5)
    assert tight.tolist() == [5] * 32
    symbols = torch.from_numpy(np.repeat(np.arange(30), fib))
    assert int(huffman_encode(symbols, 30, max_len=8)["lengths"].max()) <= 8
    with pytest.raises(ValueError, match="at most 4 bits"):
        code_lengths(np.ones(17, dtype=np.int64), 4)


def test_length_limit_costs_little_and_round_trips() -> None:
    fib = [1, 1]
    while len(fib) < 25:
        fib.append(fib[-1] + fib[-2])
    symbols = torch.from_numpy(np.repeat(np.arange(25), fib))
    parts = huffman_encode(symbols, 25, max_len=10)
    assert int(parts["lengths"].max()) == 10
    assert torch.equal(huffman_decode(parts, symbols.numel()), symbols)


@pytest.mark.parametrize("seed", range(3))
def test_coded_bits_within_huffman_bound(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    probs = torch.rand(50, generator=gen) ** 4
    symbols = torch.multinomial(probs, 20000, replacement=True, generator=gen)
    parts = huffman_encode(symbols, 50)
    bits = coded_bits(symbols, 50)
    entropy = entropy_bits(symbols, 50)
    assert entropy <= bits <= entropy + symbols.numel()
    assert payload_bits(parts) == 8 * math.ceil(bits / 8)
    assert huffman_bits(parts) == payload_bits(parts) + 8 * 50 + 32 * parts["offsets"].numel()


def test_peaked_distribution_near_entropy() -> None:
    symbols = _peaked(300_000)
    bits = coded_bits(symbols, 32)
    entropy = entropy_bits(symbols, 32)
    assert bits <= 1.03 * entropy
    assert bits < 0.8 * 5 * symbols.numel()  # well below the 5-bit packed size
    _round_trip(symbols, 32)


def test_geometric_gaps_near_entropy() -> None:
    gaps = np.random.default_rng(1).geometric(0.08, 300_000)
    fillers = (gaps - 1) // 31
    symbols = np.zeros(gaps.size + int(fillers.sum()), dtype=np.int64)
    symbols[np.arange(gaps.size) + np.cumsum(fillers)] = gaps - 31 * fillers
    assert coded_bits(symbols, 32) <= 1.03 * entropy_bits(symbols, 32)


def test_entropy_bits() -> None:
    assert entropy_bits(torch.tensor([0, 1, 2, 3]), 4) == pytest.approx(8.0)
    assert entropy_bits(torch.zeros(9, dtype=torch.int64), 4) == 0.0
    assert entropy_bits(torch.zeros(0, dtype=torch.int64), 4) == 0.0


def test_many_chunks_decode_in_lockstep() -> None:
    symbols = _peaked(300_000, seed=5)
    parts = huffman_encode(symbols, 32)
    assert parts["offsets"].numel() == -(-300_000 // 4096)
    assert torch.equal(huffman_decode(parts, symbols.numel()), symbols.to(torch.int64))


def test_bad_encode_input() -> None:
    with pytest.raises(ValueError, match="outside the alphabet"):
        huffman_encode(torch.tensor([0, 4]), 4)
    with pytest.raises(ValueError, match="outside the alphabet"):
        huffman_encode(torch.tensor([-1, 0]), 4)
    with pytest.raises(ValueError, match="integers"):
        huffman_encode(torch.tensor([0.5]), 4)
    with pytest.raises(ValueError, match="1-D"):
        huffman_encode(torch.zeros(2, 2, dtype=torch.int64), 4)
    with pytest.raises(ValueError, match="max_len"):
        huffman_encode(torch.tensor([0]), 4, max_len=17)
    with pytest.raises(ValueError, match="chunk"):
        huffman_encode(torch.tensor([0]), 4, chunk=0)
    with pytest.raises(ValueError, match="alphabet_size"):
        huffman_encode(torch.tensor([0]), 0)


def _parts() -> tuple[torch.Tensor, dict]:
    symbols = _peaked(10_000, seed=3)
    return symbols, huffman_encode(symbols, 32, chunk=1000)


def test_flipped_bytes_never_decode_silently_to_the_same() -> None:
    symbols, parts = _parts()
    stream = parts["stream"]
    gen = torch.Generator().manual_seed(0)
    for where in torch.randint(0, stream.numel(), (40,), generator=gen).tolist():
        bad = dict(parts, stream=stream.clone())
        bad["stream"][where] ^= 0xFF
        try:
            out = huffman_decode(bad, symbols.numel(), chunk=1000)
        except ValueError:
            continue
        assert not torch.equal(out, symbols)


def test_truncated_or_padded_stream_raises() -> None:
    symbols, parts = _parts()
    for cut in (1, 10, parts["stream"].numel() - 1):
        short = dict(parts, stream=parts["stream"][:-cut].clone())
        with pytest.raises(ValueError):
            huffman_decode(short, symbols.numel(), chunk=1000)
    longer = dict(parts, stream=torch.cat([parts["stream"], torch.zeros(2, dtype=torch.uint8)]))
    with pytest.raises(ValueError, match="trailing"):
        huffman_decode(longer, symbols.numel(), chunk=1000)
    with pytest.raises(ValueError):
        huffman_decode(parts, symbols.numel() + 1, chunk=1000)


def test_bad_lengths_raise() -> None:
    symbols, parts = _parts()
    over = dict(parts, lengths=torch.ones(32, dtype=torch.uint8))
    with pytest.raises(ValueError, match="Kraft"):
        huffman_decode(over, symbols.numel(), chunk=1000)
    too_long = parts["lengths"].clone()
    too_long[0] = 17
    with pytest.raises(ValueError, match=r"0\.\.16"):
        huffman_decode(dict(parts, lengths=too_long), symbols.numel(), chunk=1000)
    with pytest.raises(ValueError, match="no code"):
        huffman_decode(dict(parts, lengths=torch.zeros(32, dtype=torch.uint8)), 5, chunk=1000)
    with pytest.raises(ValueError, match="uint8"):
        huffman_decode(dict(parts, lengths=parts["lengths"].int()), 5, chunk=1000)
    with pytest.raises(ValueError, match="lack 'lengths'"):
        huffman_decode({"stream": parts["stream"]}, 5)


def test_incomplete_code_hole_raises() -> None:
    parts = huffman_encode(torch.zeros(8, dtype=torch.int64), 2)  # one symbol: code "0"
    assert parts["stream"].tolist() == [0]
    bad = dict(parts, stream=torch.tensor([0x01], dtype=torch.uint8))
    with pytest.raises(ValueError, match="no valid code"):
        huffman_decode(bad, 8)


def test_bad_offsets_raise() -> None:
    symbols, parts = _parts()
    offsets = parts["offsets"]
    cases = {
        "missing": {k: v for k, v in parts.items() if k != "offsets"},
        "count": dict(parts, offsets=offsets[:-1].clone()),
        "start": dict(parts, offsets=offsets + 1),
        "order": dict(parts, offsets=offsets.flip(0).clone()),
        "shifted": dict(parts, offsets=torch.cat([offsets[:3], offsets[3:] + 1])),
        "dtype": dict(parts, offsets=offsets.float()),
    }
    for name, bad in cases.items():
        with pytest.raises(ValueError):
            huffman_decode(bad, symbols.numel(), chunk=1000)
            pytest.fail(name)
    with pytest.raises(ValueError):  # decoder told a different chunk size
        huffman_decode(parts, symbols.numel(), chunk=500)


def test_zero_count() -> None:
    parts = huffman_encode(torch.zeros(0, dtype=torch.int64), 8)
    assert parts["stream"].numel() == 0 and "offsets" not in parts
    assert huffman_decode(parts, 0).numel() == 0
    with pytest.raises(ValueError, match="0 symbols"):
        huffman_decode(dict(parts, stream=torch.zeros(1, dtype=torch.uint8)), 0)
    with pytest.raises(ValueError, match="count"):
        huffman_decode(parts, -1)
