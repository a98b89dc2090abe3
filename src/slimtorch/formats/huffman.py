"""Canonical, length-limited Huffman coding of small-alphabet integer symbols.

Deep Compression's last stage: codebook indices and sparse-index gaps are far from uniform, so a
Huffman code stores them in close to their empirical entropy.

Parts made by :func:`huffman_encode` (all safetensors-storable):

- ``lengths``: uint8 ``[alphabet_size]``, the code length of each symbol (0: symbol unused).
  Codes are canonical (as in DEFLATE): symbols sorted by (length, value) get consecutive codes,
  so the lengths alone define the code.
- ``stream``: uint8, the codes of all symbols back to back, **MSB-first**: each code is written
  from its most significant bit, and stream bit ``k`` is bit ``7 - k % 8`` (``0x80 >> (k % 8)``)
  of byte ``k // 8`` (the order of ``np.packbits``). Unused low bits of the last byte are zero.
- ``offsets``: the bit where each chunk of ``chunk`` symbols starts (int32, int64 past 2**31 - 1
  bits); left out when all symbols fit in one chunk. They let the decoder run every chunk in
  lock step with vector operations, one symbol of every chunk per step, through a table of
  ``2**L`` entries (``L`` = longest code) indexed by the next ``L`` bits.

Code lengths are optimal under the ``max_len`` limit (package-merge). Decoding checks everything
it reads (Kraft inequality, offsets, invalid codes, each chunk ending exactly where the next one
starts, stream length and padding) and raises ValueError rather than return wrong symbols.
"""

from __future__ import annotations

import numpy as np
import torch

Parts = dict[str, torch.Tensor]
MAX_LEN = 16  # longest code allowed: the decode table has 2**L entries, indices fit uint16
CHUNK = 4096  # default symbols per chunk (the decoder needs the encoder's value)
_SLICE_SYMBOLS = 1 << 20  # symbols per encoding slice (whole chunks): bounds memory


def _array(values: torch.Tensor | np.ndarray, what: str) -> np.ndarray:
    arr = values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)
    if arr.ndim != 1:
        raise ValueError(f"{what} must be 1-D, got shape {tuple(arr.shape)}")
    if arr.dtype.kind not in "iu":
        raise ValueError(f"{what} must hold integers, got dtype {arr.dtype}")
    return arr


def _check_max_len(max_len: int) -> None:
    if isinstance(max_len, bool) or not isinstance(max_len, int) or not 1 <= max_len <= MAX_LEN:
        raise ValueError(f"max_len must be an integer in 1..{MAX_LEN}, got {max_len!r}")


def code_lengths(freqs: torch.Tensor | np.ndarray, max_len: int = MAX_LEN) -> np.ndarray:
    """Optimal code lengths (uint8) for ``freqs`` with no code longer than ``max_len``.

    Package-merge (Larmore-Hirschberg): exact minimum of ``sum(freqs * lengths)`` under the
    limit. Symbols with frequency 0 get length 0; a single used symbol gets length 1.
    """
    _check_max_len(max_len)
    f = _array(freqs, "freqs").astype(np.int64)
    if f.size and int(f.min()) < 0:
        raise ValueError("frequencies must be >= 0")
    lengths = np.zeros(f.size, dtype=np.uint8)
    used = np.flatnonzero(f)
    n = used.size
    if n <= 1:
        lengths[used] = 1
        return lengths
    if n > 2**max_len:
        raise ValueError(f"{n} used symbols cannot all get codes of at most {max_len} bits")
    order = used[np.argsort(f[used], kind="stable")]
    leaf_w = f[order]
    leaf_ids = np.arange(n)
    levels: list[np.ndarray] = [leaf_ids]  # per list: leaf index of each item, -1 for a package
    weights = leaf_w
    for _ in range(max_len - 1):
        half = weights.size // 2
        packages = weights[0 : 2 * half : 2] + weights[1 : 2 * half : 2]
        merged_w = np.concatenate((leaf_w, packages))
        merged_ids = np.concatenate((leaf_ids, np.full(half, -1)))
        by_weight = np.argsort(merged_w, kind="stable")
        weights, ids = merged_w[by_weight], merged_ids[by_weight]
        levels.append(ids)
    depth = np.zeros(n, dtype=np.int64)
    take = 2 * n - 2
    for ids in reversed(levels):
        chosen = ids[:take]
        leaves = chosen[chosen >= 0]
        depth[leaves] += 1
        take = 2 * (chosen.size - leaves.size)
    lengths[order] = depth
    return lengths


def _check_lengths(lengths: np.ndarray) -> np.ndarray:
    """Lengths as int64, checked: each in 0..MAX_LEN and the Kraft sum at most 1."""
    ln = lengths.astype(np.int64)
    if ln.size and (int(ln.min()) < 0 or int(ln.max()) > MAX_LEN):
        raise ValueError(f"code lengths must lie in 0..{MAX_LEN}, got up to {int(ln.max())}")
    used = ln[ln > 0]
    if int((1 << (MAX_LEN - used)).sum()) > 1 << MAX_LEN:
        raise ValueError("code lengths violate the Kraft inequality (over-subscribed code)")
    return ln


def _sorted_codes(ln: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Used symbols in canonical order, their lengths, left-aligned codes and the longest length."""
    used = np.flatnonzero(ln)
    order = used[np.lexsort((used, ln[used]))]
    ls = ln[order]
    longest = int(ls.max()) if ls.size else 0
    steps = np.left_shift(1, longest - ls)
    left = np.concatenate(([0], np.cumsum(steps)[:-1])) if ls.size else ls
    return order, ls, left, longest


def canonical_codes(lengths: torch.Tensor | np.ndarray) -> np.ndarray:
    """Canonical code (int64, read ``lengths[s]`` bits MSB-first) of each symbol; 0 if unused."""
    ln = _check_lengths(_array(lengths, "lengths"))
    order, ls, left, longest = _sorted_codes(ln)
    codes = np.zeros(ln.size, dtype=np.int64)
    codes[order] = left >> (longest - ls)
    return codes


def _symbols(symbols: torch.Tensor | np.ndarray, alphabet_size: int) -> np.ndarray:
    if isinstance(alphabet_size, bool) or not isinstance(alphabet_size, int) or alphabet_size < 1:
        raise ValueError(f"alphabet_size must be a positive integer, got {alphabet_size!r}")
    sym = _array(symbols, "symbols")
    if sym.size and (int(sym.min()) < 0 or int(sym.max()) >= alphabet_size):
        raise ValueError(
            f"symbols span [{int(sym.min())}, {int(sym.max())}], outside the alphabet"
            f" [0, {alphabet_size - 1}]"
        )
    return sym


def _chunk_size(chunk: int) -> int:
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be a positive integer, got {chunk!r}")
    return chunk


def huffman_encode(
    symbols: torch.Tensor | np.ndarray,
    alphabet_size: int,
    max_len: int = MAX_LEN,
    chunk: int = CHUNK,
) -> Parts:
    """Huffman-code 1-D integer ``symbols`` in ``[0, alphabet_size)``: parts ``lengths``,
    ``stream`` and (with more than one chunk) ``offsets``; see the module docstring."""
    sym = _symbols(symbols, alphabet_size)
    chunk = _chunk_size(chunk)
    freqs = np.bincount(sym, minlength=alphabet_size)
    lengths = code_lengths(freqs, max_len)
    parts: Parts = {"lengths": torch.from_numpy(lengths)}
    total_bits = int((freqs * lengths.astype(np.int64)).sum())
    stream, offsets = _write_stream(sym, lengths, chunk, total_bits)
    parts["stream"] = torch.from_numpy(stream)
    if offsets.size > 1:
        dtype = np.int32 if total_bits < 2**31 else np.int64
        parts["offsets"] = torch.from_numpy(offsets.astype(dtype))
    return parts


def _write_stream(
    sym: np.ndarray, lengths: np.ndarray, chunk: int, total_bits: int
) -> tuple[np.ndarray, np.ndarray]:
    """The packed MSB-first bit stream and the start bit of every chunk.

    Works per symbol, not per bit: each code lands in one or two 32-bit big-endian words, and
    the words are summed with ``bincount`` (float64 is exact: the codes' bits are disjoint and
    every word stays below 2**32).
    """
    codes = canonical_codes(lengths).astype(np.uint64)
    ln = lengths.astype(np.int64)
    acc = np.zeros(total_bits // 32 + 2, dtype=np.float64)
    step = chunk * max(1, _SLICE_SYMBOLS // chunk)
    starts = []
    base = 0
    for begin in range(0, sym.size, step):
        part = sym[begin : begin + step]
        lens = ln[part]
        ends = np.cumsum(lens) + base
        first = ends - lens  # start bit of each code
        starts.append(first[::chunk])
        word = first >> 5
        # code placed at bit (first % 32) of a 64-bit window starting at `word`, MSB-first
        window = codes[part] << (64 - (first & 31) - lens).astype(np.uint64)
        low, span = int(word[0]), int(word[-1] - word[0]) + 2
        rel = word - low
        acc[low : low + span] += np.bincount(rel, (window >> 32).astype(np.float64), span)
        acc[low : low + span] += np.bincount(
            rel + 1, (window & 0xFFFFFFFF).astype(np.float64), span
        )
        base = int(ends[-1])
    stream = acc.astype(np.uint32).astype(">u4").view(np.uint8)[: (total_bits + 7) // 8]
    offsets = np.concatenate(starts) if starts else np.zeros(0, dtype=np.int64)
    return stream.copy(), offsets


def _uint8_part(parts: Parts, key: str) -> np.ndarray:
    if key not in parts:
        raise ValueError(f"Huffman parts lack {key!r} (have {sorted(parts)})")
    t = parts[key]
    if t.dtype != torch.uint8 or t.dim() != 1:
        raise ValueError(f"Huffman part {key!r} must be 1-D uint8, got {t.dtype} {tuple(t.shape)}")
    return t.detach().cpu().numpy()


def _offsets(parts: Parts, n_chunks: int, stream_bits: int) -> np.ndarray:
    if "offsets" not in parts:
        if n_chunks > 1:
            raise ValueError(f"Huffman parts lack 'offsets' for {n_chunks} chunks")
        return np.zeros(1, dtype=np.int64)
    t = parts["offsets"]
    if t.dtype not in (torch.int32, torch.int64) or t.dim() != 1:
        raise ValueError(f"Huffman offsets must be 1-D int32/int64, got {t.dtype}")
    off = t.detach().cpu().numpy().astype(np.int64)
    if off.size != n_chunks:
        raise ValueError(f"Huffman offsets hold {off.size} chunk starts, expected {n_chunks}")
    if off[0] != 0 or bool((np.diff(off) < 0).any()) or int(off[-1]) > stream_bits:
        raise ValueError("Huffman offsets are inconsistent (not 0, increasing, within the stream)")
    return off


def _decode_table(ln: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Symbol and code length for every ``L``-bit prefix; symbol -1 and length 0 where no code
    starts (possible only for an incomplete code)."""
    order, ls, _, longest = _sorted_codes(ln)
    span = np.left_shift(1, longest - ls)
    size = 1 << longest
    sym_table = np.full(size, -1, dtype=np.int64)
    len_table = np.zeros(size, dtype=np.int64)
    filled = int(span.sum())
    sym_table[:filled] = np.repeat(order, span)
    len_table[:filled] = np.repeat(ls, span)
    return sym_table, len_table, longest


def huffman_decode(parts: Parts, count: int, chunk: int = CHUNK) -> torch.Tensor:
    """Inverse of :func:`huffman_encode`: ``count`` symbols as a 1-D int64 tensor.

    ``chunk`` must be the value given to the encoder. Raises ValueError on malformed parts.
    """
    chunk = _chunk_size(chunk)
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ValueError(f"count must be a non-negative integer, got {count!r}")
    ln = _check_lengths(_uint8_part(parts, "lengths"))
    stream = _uint8_part(parts, "stream")
    if count == 0:
        if stream.size or ("offsets" in parts and parts["offsets"].numel()):
            raise ValueError(f"Huffman stream holds {stream.size} bytes for 0 symbols")
        return torch.zeros(0, dtype=torch.int64)
    if not ln.any():
        raise ValueError(f"Huffman lengths define no code but {count} symbols are expected")
    n_chunks = -(-count // chunk)
    offsets = _offsets(parts, n_chunks, 8 * stream.size)
    sym_table, len_table, longest = _decode_table(ln)
    steps = min(chunk, count)
    idx, pos = _lockstep(stream, offsets, len_table, longest, steps)
    flat = idx.T.reshape(-1)[:count].astype(np.intp)
    symbols = np.take(sym_table, flat)
    if int(symbols.min()) < 0:
        raise ValueError("Huffman stream holds a bit pattern that is no valid code")
    if bool((pos[:-1] != offsets[1:]).any()):
        raise ValueError("Huffman chunks do not end where the next chunk starts (corrupt stream)")
    last = count - (n_chunks - 1) * chunk
    end = int(offsets[-1]) + int(len_table[idx[:last, -1].astype(np.intp)].sum())
    _check_tail(stream, end)
    return torch.from_numpy(symbols)


def _lockstep(
    stream: np.ndarray, offsets: np.ndarray, len_table: np.ndarray, longest: int, steps: int
) -> tuple[np.ndarray, np.ndarray]:
    """Table indices of ``steps`` symbols of every chunk (``[steps, chunks]`` uint16), decoded
    one symbol of every chunk per step, and the bit position each chunk reached."""
    pad = np.zeros(steps * longest // 8 + 8, dtype=np.uint32)
    b = np.concatenate((stream.astype(np.uint32), pad))
    word = (b[:-3] << 24) | (b[1:-2] << 16) | (b[2:-1] << 8) | b[3:]  # 32 bits from each byte
    word = word.astype(np.int64)
    pos = offsets.copy()
    out = np.empty((steps, offsets.size), dtype=np.uint16)
    low = np.int64((1 << longest) - 1)
    top = np.int64(32 - longest)
    peek = np.empty_like(pos)
    tmp = np.empty_like(pos)
    for s in range(steps):
        np.take(word, pos >> 3, out=peek)
        np.bitwise_and(pos, 7, out=tmp)
        np.subtract(top, tmp, out=tmp)
        np.right_shift(peek, tmp, out=peek)
        np.bitwise_and(peek, low, out=peek)
        out[s] = peek
        pos += len_table[peek]
    return out, pos


def _check_tail(stream: np.ndarray, end_bit: int) -> None:
    need = -(-end_bit // 8)
    if need > stream.size:
        raise ValueError(f"Huffman stream is truncated: {stream.size} bytes, codes need {need}")
    if need < stream.size:
        raise ValueError(f"Huffman stream has {stream.size - need} trailing bytes after the codes")
    if end_bit % 8 and int(stream[-1]) & ((1 << (8 - end_bit % 8)) - 1):
        raise ValueError("Huffman stream padding bits are not zero (corrupt stream)")


def payload_bits(parts: Parts) -> int:
    """Bits of the coded stream as stored (the codes plus at most 7 padding bits)."""
    return 8 * int(parts["stream"].numel())


def huffman_bits(parts: Parts) -> int:
    """Bits all the parts take when stored (stream, lengths table and offsets)."""
    return 8 * sum(t.numel() * t.element_size() for t in parts.values())


def coded_bits(
    symbols: torch.Tensor | np.ndarray, alphabet_size: int, max_len: int = MAX_LEN
) -> int:
    """Exact length in bits of the Huffman code of ``symbols``, without encoding them."""
    freqs = np.bincount(_symbols(symbols, alphabet_size), minlength=alphabet_size)
    return int((freqs * code_lengths(freqs, max_len).astype(np.int64)).sum())


def entropy_bits(symbols: torch.Tensor | np.ndarray, alphabet_size: int) -> float:
    """Empirical entropy bound: ``count * H(symbols)`` in bits (no code can be shorter on
    average with a per-symbol code built from these frequencies)."""
    freqs = np.bincount(_symbols(symbols, alphabet_size), minlength=alphabet_size)
    f = freqs[freqs > 0].astype(np.float64)
    total = float(f.sum())
    return float(-(f * np.log2(f / total)).sum()) if total else 0.0
