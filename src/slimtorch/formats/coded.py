"""The ``coded`` encoding: sparse positions and quantization codes as separate coded streams.

A sparse or quantized weight is two streams of small symbols (Deep Compression, section 4):

- *where* the kept weights are: ``index`` is ``bitmask`` (1 bit per element), ``gaps``
  (relative indices of ``index_bits`` bits with filler symbols for long gaps, see
  :mod:`slimtorch.formats.sparse_index`) or ``csr`` (row pointers and column indices); ``none``
  when every element is stored;
- *what* they are: the integer codes of the weight's quantization state (a codebook index, or
  an affine/binary/ternary code shifted to unsigned), or, for a weight without a quantization
  state, its raw values.

Each symbol stream is stored ``packed`` at its bit width or ``huffman`` coded
(:mod:`slimtorch.formats.huffman`). :func:`plans` lists the applicable combinations with their
sizes (the parts' bytes exactly, plus an estimated header cost per part), computed from symbol
histograms without building any stream, and :func:`encode`
builds the chosen one. Huffman-coded streams carry a CRC-32 of their symbols, so a stream that
decodes to wrong symbols is reported as a :class:`~slimtorch.core.errors.ChecksumError`.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from slimtorch.core.errors import ChecksumError
from slimtorch.formats import huffman, sparse_index
from slimtorch.formats.packing import pack_bits, pack_mask, packed_size, unpack_bits, unpack_mask

Parts = dict[str, torch.Tensor]
# What one part costs in the safetensors header (its JSON entry: name, dtype, shape, offsets),
# used only to rank plans. An estimate: the entries of the LeNet-300 Deep Compression artifact
# take 70-85 bytes each (968-byte header, 12 parts); 64 errs towards fewer, larger parts.
PART_OVERHEAD = 64
_GAP_WIDTHS = range(2, 9)


@dataclass(frozen=True)
class Plan:
    """One way to store a tensor's streams, and its size in bytes (parts plus header cost)."""

    index: str  # none | bitmask | gaps | csr
    index_bits: int  # gaps only
    index_coding: str  # packed | huffman (gaps only)
    codes_coding: str  # packed | huffman | raw (raw: float values, no quantization state)
    size: int

    @property
    def label(self) -> str:
        return label(self.index, self.index_bits, self.index_coding, self.codes_coding)


def label(index: str, index_bits: int, index_coding: str, codes_coding: str) -> str:
    """Short name of a plan: ``huffman+gaps5h`` = Huffman codes, 5-bit Huffman-coded gaps."""
    where = {"none": "", "bitmask": "+bitmask", "csr": "+csr"}.get(index, "")
    if index == "gaps":
        where = f"+gaps{index_bits}" + ("h" if index_coding == "huffman" else "")
    return f"{codes_coding}{where}"


def meta_label(meta: dict[str, Any]) -> str:
    """The plan label of a ``coded`` tensor's meta."""
    return label(
        str(meta.get("index")),
        int(meta.get("index_bits", 0)),
        str(meta.get("index_coding")),
        str(meta.get("codes_coding")),
    )


def _huffman_size(counts: np.ndarray, alphabet: int) -> int:
    """Bytes of the Huffman parts of a stream with symbol histogram ``counts``."""
    total = int(counts.sum())
    if total == 0:
        return 0
    lengths = huffman.code_lengths(counts, huffman.MAX_LEN)
    bits = int((np.asarray(counts, dtype=np.int64) * np.asarray(lengths, dtype=np.int64)).sum())
    chunks = math.ceil(total / huffman.CHUNK)
    offsets = 0 if chunks <= 1 else chunks * 4
    return (bits + 7) // 8 + alphabet + offsets + PART_OVERHEAD


def _index_options(mask: np.ndarray, shape: tuple[int, ...], huff: bool) -> list[tuple[Any, ...]]:
    """``(index, index_bits, index_coding, bytes)`` for every way to store ``mask``."""
    numel = mask.size
    out: list[tuple[Any, ...]] = [("bitmask", 0, "packed", (numel + 7) // 8 + PART_OVERHEAD)]
    positions = np.flatnonzero(mask)
    for bits in _GAP_WIDTHS:
        hist = sparse_index.gap_histogram(positions, bits)
        count = int(hist.sum())
        out.append(("gaps", bits, "packed", packed_size(count, bits) + PART_OVERHEAD))
        if huff and count:
            out.append(("gaps", bits, "huffman", _huffman_size(hist, 2**bits)))
    if len(shape) >= 2 and numel:
        rows = shape[0]
        cols = numel // rows
        ptr_bytes = (rows + 1) * _int_bytes(len(positions))
        col_bytes = len(positions) * _int_bytes(max(cols - 1, 0))
        out.append(("csr", 0, "packed", ptr_bytes + col_bytes + 2 * PART_OVERHEAD))
    return out


def _int_bytes(top: int) -> int:
    """Bytes per value of the integer dtype csr_encode stores values ``<= top`` in."""
    return sparse_index.smallest_uint(top).itemsize


def plans(
    codes: torch.Tensor | None,
    bits: int,
    mask: torch.Tensor | None,
    value_bytes: int,
    entropy: str,
) -> list[Plan]:
    """Every applicable plan for a tensor, smallest first.

    ``codes``: unsigned symbols ``< 2**bits`` (all elements), or None for raw values of
    ``value_bytes`` bytes each. ``mask``: kept elements (None: all kept).
    """
    huff = entropy == "huffman"
    numel = codes.numel() if codes is not None else (mask.numel() if mask is not None else 0)
    keep = mask.reshape(-1).numpy() if mask is not None else None
    kept = int(keep.sum()) if keep is not None else numel
    if codes is not None:
        flat = codes.reshape(-1)
        symbols = flat[torch.from_numpy(keep)] if keep is not None else flat
        value_opts = [("packed", packed_size(kept, bits) + PART_OVERHEAD)]
        if huff and kept:
            hist = np.bincount(symbols.numpy().astype(np.int64), minlength=2**bits)
            value_opts.append(("huffman", _huffman_size(hist, 2**bits)))
    else:
        value_opts = [("raw", kept * value_bytes + PART_OVERHEAD)]
    if keep is None:
        index_opts: list[tuple[Any, ...]] = [("none", 0, "packed", 0)]
    else:
        shape = tuple(mask.shape) if mask is not None else (numel,)
        index_opts = _index_options(keep, shape, huff)
    found = [
        Plan(index, ibits, icoding, vcoding, ibytes + vbytes)
        for index, ibits, icoding, ibytes in index_opts
        for vcoding, vbytes in value_opts
    ]
    return sorted(found, key=lambda p: p.size)


def _crc(t: torch.Tensor) -> int:
    return zlib.crc32(t.to(torch.int64).numpy().astype(np.uint16).tobytes())


def _encode_symbols(
    symbols: torch.Tensor, bits: int, coding: str, prefix: str, meta: dict[str, Any]
) -> Parts:
    """One part per stream: packed symbols, or the Huffman code lengths, chunk offsets and bit
    stream concatenated into one byte blob (one safetensors entry instead of three)."""
    if coding == "packed":
        return {prefix: pack_bits(symbols, bits)}
    hp = huffman.huffman_encode(symbols.to(torch.int64), 2**bits)
    pieces = [hp["lengths"].to(torch.uint8)]
    if "offsets" in hp:
        meta[f"{prefix}_offsets_dtype"] = dtype_of(hp["offsets"])
        pieces.append(hp["offsets"].contiguous().view(torch.uint8))
    pieces.append(hp["stream"].to(torch.uint8))
    meta[f"{prefix}_crc32"] = _crc(symbols)
    meta[f"{prefix}_payload_bits"] = huffman.payload_bits(hp)
    meta[f"{prefix}_entropy_bits"] = round(huffman.entropy_bits(symbols, 2**bits), 1)
    return {prefix: torch.cat(pieces)}


def dtype_of(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def _split_blob(
    blob: torch.Tensor, bits: int, count: int, prefix: str, meta: dict[str, Any]
) -> Parts:
    alphabet = 2**bits
    chunks = math.ceil(count / huffman.CHUNK)
    parts: Parts = {"lengths": blob[:alphabet]}
    at = alphabet
    kind = meta.get(f"{prefix}_offsets_dtype")
    if kind is not None:
        if kind not in ("int32", "int64"):
            raise ValueError(f"{prefix}: offsets dtype {kind!r} is not int32/int64")
        width = 4 if kind == "int32" else 8
        raw = blob[at : at + chunks * width].contiguous()
        if raw.numel() != chunks * width:
            raise ValueError(f"{prefix}: the stream is too short for its chunk offsets")
        parts["offsets"] = raw.view(torch.int32 if width == 4 else torch.int64)
        at += chunks * width
    parts["stream"] = blob[at:]
    return parts


def _decode_symbols(
    parts: Parts, bits: int, count: int, coding: str, prefix: str, meta: dict[str, Any]
) -> torch.Tensor:
    if coding == "packed":
        return unpack_bits(parts[prefix], bits, count).to(torch.int64)
    sub = _split_blob(parts[prefix].to(torch.uint8), bits, count, prefix, meta)
    symbols = huffman.huffman_decode(sub, count).to(torch.int64)
    if _crc(symbols) != meta.get(f"{prefix}_crc32"):
        raise ChecksumError(
            f"the Huffman-coded {prefix} stream decodes to symbols whose CRC-32 does not match"
            " the one recorded when it was written: the artifact is corrupted; re-create it"
            " with `slimtorch compress ... --force`"
        )
    return symbols


def encode(
    plan: Plan,
    codes: torch.Tensor | None,
    bits: int,
    mask: torch.Tensor | None,
    values: torch.Tensor | None,
) -> tuple[Parts, dict[str, Any]]:
    """Build the parts of ``plan`` and the meta keys that :func:`decode` needs."""
    meta: dict[str, Any] = {
        "index": plan.index,
        "index_bits": plan.index_bits or None,
        "index_coding": plan.index_coding,
        "codes_coding": plan.codes_coding,
    }
    parts: Parts = {}
    keep = mask.reshape(-1) if mask is not None else None
    if plan.index == "bitmask" and keep is not None:
        parts["mask"] = pack_mask(keep)
    elif plan.index == "gaps" and keep is not None:
        gaps = sparse_index.gap_encode(keep, plan.index_bits)
        meta["gap_count"] = int(gaps.numel())
        parts.update(_encode_symbols(gaps, plan.index_bits, plan.index_coding, "gaps", meta))
    elif plan.index == "csr" and mask is not None:
        rows = mask.shape[0]
        csr = sparse_index.csr_encode(mask.reshape(rows, -1))
        parts.update({f"csr.{k}": v for k, v in csr.items()})
    if codes is not None:
        flat = codes.reshape(-1)
        symbols = flat[keep] if keep is not None else flat
        parts.update(_encode_symbols(symbols, bits, plan.codes_coding, "codes", meta))
    elif values is not None:
        flat = values.reshape(-1)
        parts["values"] = (flat[keep] if keep is not None else flat).contiguous()
    return parts, meta


def decode_mask(meta: dict[str, Any], parts: Parts, shape: list[int]) -> torch.Tensor | None:
    """The kept-element mask (flat bool), or None when every element is stored."""
    numel = math.prod(shape)
    index = meta["index"]
    if index == "none":
        return None
    if index == "bitmask":
        return unpack_mask(parts["mask"], numel)
    if index == "gaps":
        bits = int(meta["index_bits"])
        gaps = _decode_symbols(
            parts, bits, int(meta["gap_count"]), meta["index_coding"], "gaps", meta
        )
        return sparse_index.gap_decode(gaps, bits, numel)
    if index == "csr":
        rows = shape[0] if shape else 1
        sub = {k[4:]: v for k, v in parts.items() if k.startswith("csr.")}
        return sparse_index.csr_decode(sub, rows, numel // max(rows, 1)).reshape(-1)
    raise ValueError(f"unknown index coding {index!r}")


def decode_codes(meta: dict[str, Any], parts: Parts, bits: int, count: int) -> torch.Tensor:
    """The ``count`` stored codes (kept elements only when there is an index)."""
    return _decode_symbols(parts, bits, count, meta["codes_coding"], "codes", meta)
