import logging
import math

import pytest
import torch

from slimtorch.formats.encoding import decode_tensor, encode_tensor
from slimtorch.formats.quant_parts import parts_bytes
from slimtorch.formats.state import QuantState, WeightState, code_range, effective_weight, to_matrix

GEN = torch.Generator().manual_seed(0)


def make_quant(
    shape: tuple[int, ...],
    bits: int,
    scheme: str = "affine",
    granularity: str = "per_channel",
    group_size: int | None = None,
    signed: bool = True,
    asymmetric: bool = False,
    scale_dtype: str = "float32",
) -> QuantState:
    """A QuantState built by hand: random codes on the grid, positive scales."""
    rows, cols = to_matrix(torch.empty(shape)).shape
    scale_shape = {
        "per_tensor": (1, 1),
        "per_channel": (rows, 1),
        "per_group": (rows, math.ceil(cols / (group_size or 1))),
    }[granularity]
    lo, hi = {"binary": (0, 1), "ternary": (0, 2)}.get(scheme, code_range(bits, signed))
    codes = torch.randint(lo, hi + 1, shape, generator=GEN, dtype=torch.int32)
    scale = torch.rand(scale_shape, generator=GEN) * 0.1 + 0.01
    if scale_dtype == "float16":
        scale = scale.half().float()
    zp = torch.zeros(scale_shape, dtype=torch.int32)
    if asymmetric:
        zp = torch.randint(lo, hi + 1, scale_shape, generator=GEN, dtype=torch.int32)
    return QuantState(
        scheme,
        bits,
        signed,
        granularity,
        codes.to(torch.int8 if bits <= 8 and signed else torch.int32),  # type: ignore[arg-type]
        scale,
        zp,
        group_size,
        scale_dtype,
    )  # type: ignore[arg-type]


def sparse_mask(shape: tuple[int, ...], sparsity: float) -> torch.Tensor:
    return torch.rand(shape, generator=GEN) >= sparsity


def roundtrip(
    tensor: torch.Tensor, state: WeightState | None
) -> tuple[dict, torch.Tensor, WeightState | None]:
    parts, meta = encode_tensor(tensor, state)
    out, back = decode_tensor(meta, parts)
    expected = effective_weight(state, tensor) if state is not None else tensor
    assert out.dtype == tensor.dtype and out.shape == tensor.shape
    assert torch.equal(out, expected)
    assert meta["bytes"] == parts_bytes(parts)
    assert meta["nonzero"] == int((expected != 0).sum())
    return meta, out, back


def assert_same_quant(a: QuantState, b: QuantState, mask: torch.Tensor | None = None) -> None:
    for f in ("scheme", "bits", "signed", "granularity", "group_size", "scale_dtype"):
        assert getattr(a, f) == getattr(b, f), f
    assert torch.equal(a.scale.float(), b.scale)
    assert torch.equal(a.zero_point.to(torch.int32), b.zero_point)
    assert a.codes.dtype == b.codes.dtype
    keep = torch.ones_like(a.codes, dtype=torch.bool) if mask is None else mask
    assert torch.equal(a.codes[keep], b.codes[keep])


def quant_tensor(
    state: WeightState, shape: tuple[int, ...], dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    return effective_weight(state, torch.empty(shape, dtype=dtype))


def test_dense_tensor_stays_dense() -> None:
    w = torch.randn(64, 32, generator=GEN)
    meta, _, back = roundtrip(w, None)
    assert meta["encoding"] == "dense" and back is None
    assert meta["bytes"] == w.numel() * 4
    assert meta.get("bits") is None


def test_sparse_fp32_uses_bitmask() -> None:
    w = torch.randn(64, 32, generator=GEN) * sparse_mask((64, 32), 0.9)
    meta, _, back = roundtrip(w, None)
    # the values of the kept weights, and their positions as gap indices (smaller than a bitmask)
    assert meta["encoding"] == "coded" and meta["index"] == "gaps" and back is None
    assert meta["bytes"] < 64 * 32 // 8 + int((w != 0).sum()) * 4


def test_int8_quant() -> None:
    q = make_quant((48, 40), 8)
    state = WeightState(quant=q)
    w = quant_tensor(state, (48, 40))
    meta, _, back = roundtrip(w, state)
    assert meta["encoding"] == "quant" and meta["parts"] == ["codes", "scale"]
    assert meta["bytes"] == 48 * 40 + 48 * 4
    assert back is not None and back.mask is None and back.quant is not None
    assert_same_quant(q, back.quant)


def test_sparse_int8_stores_kept_codes_only() -> None:
    q = make_quant((48, 40), 8)
    mask = sparse_mask((48, 40), 0.9)
    state = WeightState(mask=mask, quant=q)
    meta, _, back = roundtrip(quant_tensor(state, (48, 40)), state)
    kept = int(mask.sum())
    # kept codes plus gap indices: smaller than the quant-bitmask layout (bitmask + kept codes)
    assert meta["encoding"] == "coded" and meta["index"] in {"gaps", "csr"}
    assert meta["bytes"] < 48 * 40 // 8 + kept + 48 * 4
    assert back is not None and back.quant is not None and back.mask is not None
    assert torch.equal(back.mask, mask)
    assert_same_quant(q, back.quant, mask)
    assert (back.quant.codes[~mask] == 0).all()  # symmetric: pruned codes are the zero point


def test_quant_with_full_mask_keeps_mask() -> None:
    q = make_quant((8, 8), 8)
    state = WeightState(mask=torch.ones(8, 8, dtype=torch.bool), quant=q)
    meta, _, back = roundtrip(quant_tensor(state, (8, 8)), state)
    assert meta["encoding"] == "quant" and "mask" in meta["parts"]
    assert back is not None and back.mask is not None and bool(back.mask.all())


def test_int4_per_group_fp16_scales() -> None:
    q = make_quant((8, 40), 4, granularity="per_group", group_size=16, scale_dtype="float16")
    state = WeightState(quant=q)
    meta, _, back = roundtrip(quant_tensor(state, (8, 40)), state)
    assert meta["encoding"] == "quant" and meta["group_size"] == 16
    assert meta["bytes"] == 8 * 40 // 2 + 8 * 3 * 2  # packed codes + fp16 scales
    assert back is not None and back.quant is not None
    assert_same_quant(q, back.quant)


def test_binary_and_ternary() -> None:
    for scheme, bits in (("binary", 1), ("ternary", 2)):
        q = make_quant((16, 24), bits, scheme=scheme, signed=False)
        state = WeightState(quant=q)
        meta, _, back = roundtrip(quant_tensor(state, (16, 24)), state)
        assert meta["encoding"] == "quant" and meta["scheme"] == scheme
        assert meta["bytes"] == 16 * 24 * bits // 8 + 16 * 4
        assert back is not None and back.quant is not None
        assert_same_quant(q, back.quant)


def test_sparse_ternary_conv_fills_pruned_codes_with_zero_code() -> None:
    shape = (6, 3, 3, 3)
    q = make_quant(shape, 2, scheme="ternary", signed=False)
    mask = sparse_mask(shape, 0.8)
    state = WeightState(mask=mask, quant=q)
    meta, _, back = roundtrip(quant_tensor(state, shape), state)
    assert meta["encoding"] in {"quant-bitmask", "coded"}
    assert back is not None and back.quant is not None
    assert (back.quant.codes[~mask] == 1).all()
    assert_same_quant(q, back.quant, mask)


def test_asymmetric_nonzero_zero_point() -> None:
    shape = (5, 4, 3)  # conv1d weight, per channel
    q = make_quant(shape, 8, signed=False, asymmetric=True)
    mask = sparse_mask(shape, 0.5)
    state = WeightState(mask=mask, quant=q)
    parts, _ = encode_tensor(quant_tensor(state, shape), state)
    assert parts["zero_point"].dtype == torch.uint8
    _, _, back = roundtrip(quant_tensor(state, shape), state)
    assert back is not None and back.quant is not None
    assert_same_quant(q, back.quant, mask)
    zp = back.quant.zero_point.reshape(-1, 1, 1).expand(shape)
    assert torch.equal(back.quant.codes[~mask].int(), zp[~mask])


def test_signed_zero_point_uses_int8() -> None:
    q = make_quant((4, 8), 4, signed=True, asymmetric=True, granularity="per_tensor")
    q.zero_point = torch.tensor([[-3]], dtype=torch.int32)
    state = WeightState(quant=q)
    parts, _ = encode_tensor(quant_tensor(state, (4, 8)), state)
    assert parts["zero_point"].dtype == torch.int8
    roundtrip(quant_tensor(state, (4, 8)), state)


def test_wide_codes_are_stored_unpacked() -> None:
    q = make_quant((4, 6), 12, granularity="per_tensor")
    state = WeightState(quant=q)
    meta, _, back = roundtrip(quant_tensor(state, (4, 6)), state)
    assert meta["bits"] == 12
    assert back is not None and back.quant is not None
    assert_same_quant(q, back.quant)


def test_mask_only_state_is_kept_even_when_dense() -> None:
    w = torch.randn(16, 16, generator=GEN)
    mask = torch.ones(16, 16, dtype=torch.bool)
    mask[0, 0] = False
    state = WeightState(mask=mask, extra={"method": "prune.magnitude", "tensor": torch.ones(1)})
    meta, _, back = roundtrip(effective_weight(state, w), state)
    assert meta["encoding"] == "bitmask" and meta["has_mask"]
    assert back is not None and back.mask is not None and torch.equal(back.mask, mask)
    assert back.extra == {"method": "prune.magnitude"}  # non-JSON extras are dropped


@pytest.mark.parametrize(
    "tensor",
    [
        torch.randn(7, 3).half(),
        torch.randn(7, 3).bfloat16(),
        torch.randn(5).double(),
        torch.tensor([0, 0, 5, 0, 0, 0, 0, 0, 0, 0, 0, 0], dtype=torch.int8),
        torch.tensor(12345, dtype=torch.int64),
        torch.tensor(0.25),
        torch.zeros(0, 4),
        torch.tensor([True, False, False, True]),
        torch.zeros(40, dtype=torch.bool),
        torch.arange(6, dtype=torch.uint8).reshape(2, 3),
        torch.zeros(3, 3, dtype=torch.int64),
    ],
)
def test_every_state_dict_dtype(tensor: torch.Tensor) -> None:
    meta, _, back = roundtrip(tensor, None)
    assert back is None
    assert meta["dtype"] == str(tensor.dtype).removeprefix("torch.")


def test_sparse_bool_tensor_stores_no_values() -> None:
    t = torch.zeros(64, dtype=torch.bool)
    t[3] = True
    parts, meta = encode_tensor(t)
    assert meta["encoding"] == "bitmask" and set(parts) == {"mask"}
    assert torch.equal(decode_tensor(meta, parts)[0], t)


def test_state_on_half_tensor() -> None:
    state = WeightState(quant=make_quant((8, 8), 8))
    w = quant_tensor(state, (8, 8), torch.float16)
    meta, out, _ = roundtrip(w, state)
    assert meta["dtype"] == "float16" and out.dtype == torch.float16


def test_fp16_scale_that_is_not_exact_is_stored_fp32(caplog: pytest.LogCaptureFixture) -> None:
    q = make_quant((4, 4), 8, scale_dtype="float16")
    q.scale = q.scale + 1e-6
    state = WeightState(quant=q)
    with caplog.at_level(logging.WARNING):
        parts, _ = encode_tensor(quant_tensor(state, (4, 4)), state)
    assert parts["scale"].dtype == torch.float32 and "float16" in caplog.text
    roundtrip(quant_tensor(state, (4, 4)), state)


def test_tensor_differing_from_state_warns(caplog: pytest.LogCaptureFixture) -> None:
    state = WeightState(quant=make_quant((4, 4), 8))
    with caplog.at_level(logging.WARNING):
        parts, meta = encode_tensor(torch.zeros(4, 4), state, name="fc.weight")
    assert "fc.weight" in caplog.text
    assert torch.equal(decode_tensor(meta, parts)[0], quant_tensor(state, (4, 4)))


def test_bad_states() -> None:
    q = make_quant((4, 4), 4)
    q.codes = q.codes.int() + 100
    with pytest.raises(ValueError, match="outside"):
        encode_tensor(torch.zeros(4, 4), WeightState(quant=q))
    with pytest.raises(ValueError, match="mask has 3 elements, the tensor 16"):
        encode_tensor(torch.zeros(4, 4), WeightState(mask=torch.ones(3, dtype=torch.bool)))


def test_decode_rejects_unknown_encoding() -> None:
    parts, meta = encode_tensor(torch.ones(3))
    with pytest.raises(ValueError, match="unknown encoding"):
        decode_tensor({**meta, "encoding": "zstd"}, parts)
    with pytest.raises(ValueError, match="unknown dtype"):
        decode_tensor({**meta, "dtype": "float99"}, parts)


def test_reencoding_a_decoded_state_gives_identical_parts() -> None:
    q = make_quant(
        (12, 20), 4, granularity="per_group", group_size=8, signed=False, asymmetric=True
    )
    state = WeightState(mask=sparse_mask((12, 20), 0.7), quant=q)
    parts, meta = encode_tensor(quant_tensor(state, (12, 20)), state)
    out, back = decode_tensor(meta, parts)
    parts2, meta2 = encode_tensor(out, back)
    assert meta2 == meta
    assert all(torch.equal(parts[k], parts2[k]) for k in parts)
