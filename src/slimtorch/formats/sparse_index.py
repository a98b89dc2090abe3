"""Positions of the kept elements of a sparse tensor: relative (gap) indices and CSR.

Relative indices (Deep Compression, section 3): each kept element stores the distance from the
previous kept element in ``bits`` bits. With ``M = 2**bits - 1``:

- symbol ``s`` in ``1..M``: the next kept element is ``s`` positions after the previous one (the
  first one: after position -1);
- symbol ``0`` (the filler): advance ``M`` positions, no element there. The paper stores a zero
  weight at a filler; here the decoder knows a filler holds nothing, so no weight slot is spent.

A gap ``d >= 1`` becomes ``(d - 1) // M`` fillers then the symbol ``d - M * ((d - 1) // M)``:
gaps ``M``, ``M + 1`` and ``2M`` are ``[M]``, ``[0, 1]`` and ``[0, M]``. Elements after the last
kept one need no symbols (the element count is known), so the stream never ends in a filler.
Symbols are stored as uint8 (pack them with :func:`slimtorch.formats.packing.pack_bits` or
Huffman-code them).

CSR: ``row_ptr`` (``rows + 1`` entries, row ``r`` keeps columns ``col_idx[row_ptr[r]:
row_ptr[r + 1]]``, increasing) and ``col_idx``, each in the smallest of uint8, int16, int32 and
int64 that holds its values.
"""

from __future__ import annotations

import numpy as np
import torch

from slimtorch.formats.packing import packed_size

Parts = dict[str, torch.Tensor]
GAP_WIDTHS = tuple(range(1, 9))


def _check_bits(bits: int) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"gap index bits must be an integer in 1..8, got {bits!r}")
    return 2**bits - 1


def _positions(mask: torch.Tensor) -> np.ndarray:
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor, got {getattr(mask, 'dtype', type(mask))}")
    return np.flatnonzero(mask.detach().cpu().reshape(-1).numpy())


def _gaps(positions: np.ndarray) -> np.ndarray:
    return np.diff(positions, prepend=-1)


def gap_symbol_count(mask: torch.Tensor, bits: int) -> int:
    """How many symbols :func:`gap_encode` writes for ``mask`` (kept elements plus fillers)."""
    m = _check_bits(bits)
    gaps = _gaps(_positions(mask))
    return int(gaps.size + ((gaps - 1) // m).sum())


def gap_histogram(positions: np.ndarray, bits: int) -> np.ndarray:
    """Counts of the ``2**bits`` gap symbols :func:`gap_encode` writes for kept ``positions``
    (ascending flat indices): symbol 0 counts the fillers."""
    m = _check_bits(bits)
    gaps = _gaps(positions)
    rest = (gaps - 1) % m + 1
    hist = np.bincount(rest, minlength=2**bits).astype(np.int64)
    hist[0] = int(((gaps - rest) // m).sum())
    return hist


def gap_sizes(mask: torch.Tensor) -> dict[int, int]:
    """Packed bytes of the gap symbols of ``mask`` at every width 1..8 (positions found once)."""
    gaps = _gaps(_positions(mask)) - 1
    out = {}
    for bits in GAP_WIDTHS:
        count = gaps.size + int((gaps // (2**bits - 1)).sum())
        out[bits] = packed_size(count, bits)
    return out


def best_gap_bits(mask: torch.Tensor) -> int:
    """The width in 1..8 whose packed gap symbols are smallest (the narrower one on ties)."""
    sizes = gap_sizes(mask)
    return min(sizes, key=lambda b: (sizes[b], b))


def gap_encode(mask: torch.Tensor, bits: int) -> torch.Tensor:
    """Gap symbols (1-D uint8, values ``0..2**bits - 1``) of the kept elements of ``mask``
    (any shape, read flattened)."""
    m = _check_bits(bits)
    gaps = _gaps(_positions(mask))
    fillers = (gaps - 1) // m
    rest = gaps - fillers * m
    slots = np.arange(gaps.size) + np.cumsum(fillers)  # where each kept element's symbol lands
    out = np.zeros(gaps.size + int(fillers.sum()), dtype=np.uint8)
    out[slots] = rest
    return torch.from_numpy(out)


def gap_decode(symbols: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of :func:`gap_encode`: a 1-D bool mask of ``numel`` elements.

    Raises ValueError for symbols above ``2**bits - 1``, a trailing filler, or a position past
    ``numel``.
    """
    m = _check_bits(bits)
    if isinstance(numel, bool) or not isinstance(numel, int) or numel < 0:
        raise ValueError(f"numel must be a non-negative integer, got {numel!r}")
    if symbols.dim() != 1 or symbols.dtype.is_floating_point or symbols.dtype == torch.bool:
        raise ValueError(f"gap symbols must be a 1-D integer tensor, got {symbols.dtype}")
    sym = symbols.detach().cpu().numpy().astype(np.int64)
    out = np.zeros(numel, dtype=bool)
    if sym.size == 0:
        return torch.from_numpy(out)
    if int(sym.min()) < 0 or int(sym.max()) > m:
        raise ValueError(
            f"gap symbols span [{int(sym.min())}, {int(sym.max())}], outside [0, {m}]"
            f" of {bits}-bit gaps"
        )
    if sym[-1] == 0:
        raise ValueError("gap symbols end in a filler (0), which the encoder never writes")
    positions = np.cumsum(np.where(sym == 0, m, sym)) - 1
    kept = positions[sym != 0]
    if int(kept[-1]) >= numel:
        raise ValueError(f"gap symbols reach position {int(kept[-1])}, past numel {numel}")
    out[kept] = True
    return torch.from_numpy(out)


def smallest_uint(top: int) -> torch.dtype:
    for dtype in (torch.uint8, torch.int16, torch.int32):
        if top <= torch.iinfo(dtype).max:
            return dtype
    return torch.int64


def csr_encode(mask2d: torch.Tensor) -> Parts:
    """CSR parts ``row_ptr`` and ``col_idx`` of a 2-D bool mask."""
    if not isinstance(mask2d, torch.Tensor) or mask2d.dtype != torch.bool or mask2d.dim() != 2:
        raise ValueError(f"csr_encode needs a 2-D bool tensor, got {getattr(mask2d, 'dtype', '?')}")
    m = mask2d.detach().cpu().numpy()
    rows, cols = m.shape
    r, c = np.nonzero(m)  # row-major order: rows ascending, columns ascending in a row
    row_ptr = np.zeros(rows + 1, dtype=np.int64)
    np.cumsum(np.bincount(r, minlength=rows), out=row_ptr[1:])
    return {
        "row_ptr": torch.from_numpy(row_ptr).to(smallest_uint(int(r.size))),
        "col_idx": torch.from_numpy(c.astype(np.int64)).to(smallest_uint(max(cols - 1, 0))),
    }


def _int_part(parts: Parts, key: str) -> np.ndarray:
    if key not in parts:
        raise ValueError(f"CSR parts lack {key!r} (have {sorted(parts)})")
    t = parts[key]
    if t.dim() != 1 or t.dtype.is_floating_point or t.dtype == torch.bool:
        raise ValueError(f"CSR part {key!r} must be a 1-D integer tensor, got {t.dtype}")
    return t.detach().cpu().numpy().astype(np.int64)


def csr_decode(parts: Parts, rows: int, cols: int) -> torch.Tensor:
    """Inverse of :func:`csr_encode`: a ``[rows, cols]`` bool mask. Raises ValueError on
    malformed parts (pointers not starting at 0, decreasing or not matching ``col_idx``;
    columns out of range, repeated or unsorted within a row)."""
    if rows < 0 or cols < 0:
        raise ValueError(f"rows and cols must be >= 0, got {rows} x {cols}")
    ptr, col = _int_part(parts, "row_ptr"), _int_part(parts, "col_idx")
    if ptr.size != rows + 1:
        raise ValueError(f"CSR row_ptr holds {ptr.size} entries, expected rows + 1 = {rows + 1}")
    counts = np.diff(ptr)
    if ptr[0] != 0 or bool((counts < 0).any()) or int(ptr[-1]) != col.size:
        raise ValueError(
            f"CSR row_ptr must start at 0, never decrease and end at len(col_idx) = {col.size}"
        )
    if col.size and (int(col.min()) < 0 or int(col.max()) >= cols):
        raise ValueError(f"CSR col_idx spans [{int(col.min())}, {int(col.max())}], not [0, {cols})")
    row = np.repeat(np.arange(rows), counts)
    if bool(((row[1:] == row[:-1]) & (col[1:] <= col[:-1])).any()):
        raise ValueError("CSR col_idx must increase strictly within each row")
    out = np.zeros(rows * cols, dtype=bool)
    out[row * cols + col] = True
    return torch.from_numpy(out.reshape(rows, cols))
