"""The coded encoding: exact size estimates, exact round trips, corrupted streams detected."""

from __future__ import annotations

import pytest
import torch

from slimtorch.core.errors import ChecksumError
from slimtorch.formats import coded
from slimtorch.formats.encoding import decode_tensor, encode_tensor
from slimtorch.formats.quant_parts import parts_bytes
from slimtorch.formats.state import WeightState, codebook_state, effective_weight

GEN = torch.Generator().manual_seed(0)


def peaked_codes(shape: tuple[int, ...], bits: int) -> torch.Tensor:
    w = torch.randn(shape, generator=GEN)
    edges = torch.linspace(-3, 3, 2**bits + 1)[1:-1]
    return torch.bucketize(w, edges)


@pytest.mark.parametrize("density", [0.03, 0.1, 0.5])
@pytest.mark.parametrize("entropy", ["none", "huffman"])
def test_plan_sizes_are_exact(density: float, entropy: str) -> None:
    shape = (40, 300)
    codes = peaked_codes(shape, 5)
    mask = torch.rand(shape, generator=GEN) < density
    found = coded.plans(codes, 5, mask, 4, entropy)
    assert found == sorted(found, key=lambda p: p.size)
    kinds = {(p.index, p.index_coding, p.codes_coding) for p in found}
    assert ("gaps", "packed", "packed") in kinds and ("csr", "packed", "packed") in kinds
    assert (("gaps", "huffman", "huffman") in kinds) == (entropy == "huffman")
    for plan in found:
        parts, meta = coded.encode(plan, codes, 5, mask, None)
        assert parts_bytes(parts) + coded.PART_OVERHEAD * len(parts) == plan.size, plan
        assert torch.equal(coded.decode_mask(meta, parts, list(shape)), mask.reshape(-1))
        kept = int(mask.sum())
        assert torch.equal(coded.decode_codes(meta, parts, 5, kept), codes[mask].reshape(-1))


def shared_state(shape: tuple[int, ...], density: float) -> tuple[torch.Tensor, WeightState]:
    codebook = torch.linspace(-1, 1, 32)
    codes = peaked_codes(shape, 5).to(torch.uint8)
    mask = torch.rand(shape, generator=GEN) < density
    state = WeightState(mask=mask, quant=codebook_state(codes * mask, codebook, 5))
    return effective_weight(state, torch.empty(shape)), state


def test_huffman_beats_packing_and_round_trips_exactly() -> None:
    w, state = shared_state((100, 300), 0.08)
    plain, _ = encode_tensor(w, state, "w", "none")
    parts, meta = encode_tensor(w, state, "w", "huffman")
    assert meta["encoding"] == "coded" and meta["codes_coding"] == "huffman"
    assert parts_bytes(parts) < parts_bytes(plain)
    # Huffman stays within 3% of the empirical entropy of its symbols
    assert meta["codes_payload_bits"] <= 1.03 * meta["codes_entropy_bits"] + 8
    back, st = decode_tensor(meta, parts)
    assert torch.equal(back, w)
    assert st is not None and st.quant is not None and st.mask is not None
    assert torch.equal(st.mask, state.mask) and torch.equal(st.quant.codebook, state.quant.codebook)  # type: ignore[union-attr,arg-type]
    assert torch.equal(st.quant.codes[state.mask], state.quant.codes[state.mask])  # type: ignore[union-attr,index]


def test_dense_codebook_without_mask() -> None:
    shape = (16, 8, 3, 3)
    codes = peaked_codes(shape, 8).to(torch.uint8)
    state = WeightState(quant=codebook_state(codes, torch.randn(256).sort().values, 8))
    w = effective_weight(state, torch.empty(shape))
    for entropy in ("none", "huffman"):
        parts, meta = encode_tensor(w, state, "w", entropy)
        assert meta["index"] == "none" and meta["scheme"] == "codebook"
        back, st = decode_tensor(meta, parts)
        assert torch.equal(back, w) and st is not None and st.mask is None


def test_corrupted_huffman_stream_is_a_checksum_error() -> None:
    w, state = shared_state((100, 300), 0.08)
    parts, meta = encode_tensor(w, state, "w", "huffman")
    blob = parts["codes"].clone()
    blob[-len(blob) // 3] ^= 0x5A  # inside the bit stream
    with pytest.raises((ChecksumError, ValueError)):
        decode_tensor(meta, {**parts, "codes": blob})
    bad = dict(meta, codes_crc32=meta["codes_crc32"] ^ 1)
    with pytest.raises(ChecksumError, match="CRC-32"):
        decode_tensor(bad, parts)


def test_codebook_index_past_the_end_is_refused() -> None:
    codes = torch.full((4, 4), 3, dtype=torch.uint8)
    state = WeightState(quant=codebook_state(codes, torch.tensor([0.0, 1.0, 2.0, 3.0]), 2))
    parts, meta = encode_tensor(effective_weight(state, torch.empty(4, 4)), state, "w")
    with pytest.raises(ValueError, match="codebook"):
        decode_tensor(meta, {**parts, "codebook": torch.tensor([0.0, 1.0])})
