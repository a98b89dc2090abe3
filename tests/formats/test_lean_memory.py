"""Dequantizing and encoding a big quantized weight without full-size integer temporaries.

The offloaded run's last step quantizes and saves SmolLM2's 113 MB tied embedding; int32/int64
copies of its codes took it over ``--max-memory 1GB`` (issue 15 point 7). The values and bytes
written must stay exactly what the int32 route gave.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from slimtorch.formats import encoding
from slimtorch.formats.encoding import decode_tensor, encode_tensor
from slimtorch.formats.quant_parts import encode_codes, unsigned_codes
from slimtorch.formats.state import QuantState, WeightState, code_range, dequantize, to_matrix


def reference(q: QuantState, shape: tuple[int, ...]) -> torch.Tensor:
    """The int32 formula dequantize used before: ``(codes - zp).float() * scale`` at full size."""
    from slimtorch.formats.state import from_matrix

    codes = to_matrix(q.codes.to(torch.int32))
    n = codes.shape[1]
    zp = q.expand(q.zero_point.to(torch.int32), n)
    return from_matrix(
        (codes - zp).to(torch.float32) * q.expand(q.scale.to(torch.float32), n), shape
    )


def state(
    shape: tuple[int, ...], bits: int, signed: bool, granularity: str, group: int | None, seed: int
) -> QuantState:
    g = torch.Generator().manual_seed(seed)
    lo, hi = code_range(bits, signed)
    rows = shape[0]
    cols = int(torch.tensor(shape[1:]).prod()) if len(shape) > 1 else shape[0]
    if len(shape) < 2:
        rows = 1
    n_par = {"per_tensor": (1, 1), "per_channel": (rows, 1)}.get(
        granularity, (rows, -(-cols // (group or 1)))
    )
    dtype = torch.int8 if bits <= 8 and signed else torch.int32
    codes = torch.randint(lo, hi + 1, shape, generator=g).to(dtype)
    scale = torch.randn(n_par, generator=g) * 0.1  # some negative: signs of zeros must match
    zp = torch.randint(lo, hi + 1, n_par, generator=g, dtype=torch.int32)
    return QuantState(
        "affine", bits, signed, granularity, codes, scale, zp,  # type: ignore[arg-type]
        group_size=group if granularity == "per_group" else None,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("shape", "bits", "signed", "granularity", "group"),
    [
        ((48, 64), 8, True, "per_channel", None),
        ((48, 64), 4, False, "per_group", 16),
        ((48, 70), 4, False, "per_group", 16),  # 70 columns: a last partial group
        ((48, 64), 3, True, "per_tensor", None),
        ((8, 6, 3, 3), 5, False, "per_group", 9),  # conv: the input channel last
        ((40,), 8, True, "per_channel", None),
        ((32, 64), 12, False, "per_group", 32),
    ],
)
def test_dequantize_is_bit_identical_to_the_int32_formula(
    shape: tuple[int, ...], bits: int, signed: bool, granularity: str, group: int | None
) -> None:
    q = state(shape, bits, signed, granularity, group, seed=bits)
    got, want = dequantize(q, shape), reference(q, shape)
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))  # -0.0 vs 0.0 too
    before = q.codes.clone()
    dequantize(q, shape)
    assert torch.equal(q.codes, before)  # the state's codes are not written to


def test_dequantize_of_transposed_codes_and_float_codes() -> None:
    q = state((32, 64), 4, False, "per_group", 16, seed=1)
    q.codes = q.codes.t().contiguous().t()  # same values, column-major
    assert torch.equal(dequantize(q, (32, 64)), reference(q, (32, 64)))
    q.codes = q.codes.to(torch.float32)
    assert torch.equal(dequantize(q, (32, 64)), reference(q, (32, 64)))


@pytest.mark.parametrize(
    ("bits", "signed"), [(8, True), (8, False), (4, True), (3, False), (12, True)]
)
def test_unsigned_codes_are_small_and_exact(bits: int, signed: bool) -> None:
    q = state((16, 32), bits, signed, "per_channel", None, seed=3)
    lo = code_range(bits, signed)[0]
    got = unsigned_codes(q.codes.reshape(-1), q, "w")
    want = q.codes.reshape(-1).to(torch.int64) - lo
    assert got.dtype == (torch.uint8 if bits <= 8 else torch.int32)
    assert torch.equal(got.to(torch.int64), want)
    assert int(want.min()) >= 0 and int(want.max()) < 2**bits
    wide = q.codes.to(torch.int32)
    wide[0, 0] = lo - 1  # out of range: refused before it could wrap around in a small dtype
    with pytest.raises(ValueError, match="outside"):
        encode_codes(wide.reshape(-1), q, "w")


def test_encoded_bytes_round_trip() -> None:
    for bits, granularity, group in [(8, "per_channel", None), (4, "per_group", 16)]:
        q = state((64, 64), bits, bits == 8, granularity, group, seed=bits)
        w = dequantize(q, (64, 64))
        parts, meta = encode_tensor(w, WeightState(quant=q), "w")
        assert meta["encoding"] == "quant" and meta["nonzero"] == int((w != 0).sum())
        back, st = decode_tensor(meta, parts)
        assert torch.equal(back, w) and st is not None and st.quant is not None
        assert torch.equal(st.quant.codes.to(torch.int32), q.codes.to(torch.int32))


class PeakMeter:
    """Peak resident memory since :meth:`reset` (Linux /proc and glibc; skips elsewhere)."""

    def __init__(self) -> None:
        libc_name = ctypes.util.find_library("c")
        if not sys.platform.startswith("linux") or libc_name is None:
            pytest.skip("peak resident memory is measured through Linux /proc")
        libc = ctypes.CDLL(libc_name)
        if not hasattr(libc, "mallopt"):
            pytest.skip("needs glibc's mallopt")
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD: big buffers go back when freed
        self.start = 0.0

    def _status(self, key: str) -> float:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1]) / 1024
        pytest.skip(f"/proc/self/status has no {key}")

    def reset(self) -> None:
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pytest.skip("cannot reset the peak (/proc/self/clear_refs)")
        self.start = self._status("VmRSS")

    def mib(self) -> float:
        return self._status("VmHWM") - self.start


@pytest.mark.parametrize(("granularity", "group"), [("per_channel", None), ("per_group", 64)])
def test_dequantize_and_encode_peak_memory(granularity: str, group: int | None) -> None:
    meter = PeakMeter()
    rows, cols = 8192, 1024  # 32 MiB of float32
    q = state((rows, cols), 8, True, granularity, group, seed=0)
    size = rows * cols * 4 / 2**20
    meter.reset()
    w = dequantize(q, (rows, cols))
    assert meter.mib() / size < 1.5  # was 3.0 (4.0 per group): int32 codes, difference, product
    meter.reset()
    encode_tensor(w, WeightState(quant=q), "w")
    assert meter.mib() / size < 3.0  # was 5.3: int64 copies of the codes, a bool sum in int64


@pytest.mark.parametrize(
    ("granularity", "group"), [("per_tensor", None), ("per_channel", None), ("per_group", 16)]
)
def test_row_sliced_check_matches_the_whole_tensor_path(
    granularity: str, group: int | None, monkeypatch: pytest.MonkeyPatch, caplog: Any
) -> None:
    q = state((50, 64), 4, False, granularity, group, seed=7)
    w = dequantize(q, (50, 64))
    w[3, :5] = 0.0  # state values and tensor agree; some zeros to count
    q.codes[3, :5] = q.zero_point[3 if granularity != "per_tensor" else 0, 0]
    w = dequantize(q, (50, 64))
    changed = w.clone()
    changed[49, 0] += 1.0  # the tensor no longer matches its state: the state's values win
    monkeypatch.setattr(encoding, "ROWS_AT_ONCE", 7)
    for tensor, warns in ((w, False), (changed, True)):
        caplog.clear()
        parts, meta = encode_tensor(tensor, WeightState(quant=q), "w")
        assert ("differs from the values" in caplog.text) == warns
        with monkeypatch.context() as m:
            m.setattr(encoding, "_compare_by_rows", lambda state, t: None)
            caplog.clear()
            want_parts, want_meta = encode_tensor(tensor, WeightState(quant=q), "w")
            assert ("differs from the values" in caplog.text) == warns
        assert meta == want_meta and meta["nonzero"] == int((w != 0).sum()) < w.numel()
        assert parts.keys() == want_parts.keys()
        assert all(torch.equal(parts[k], want_parts[k]) for k in parts)
