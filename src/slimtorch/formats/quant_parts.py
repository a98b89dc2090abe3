"""Quantized weights as parts: packed codes, scales and zero points, or a codebook.

Shared by the fixed ``quant``/``quant-bitmask`` encodings and the ``coded`` encoding (see
:mod:`slimtorch.formats.encoding`): how codes are shifted to unsigned and packed, how scales are
stored (fp16 where exact), and how a :class:`~slimtorch.formats.state.QuantState` is rebuilt
from its parts.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from slimtorch.formats import coded, floats
from slimtorch.formats.packing import pack_bits, pack_mask, unpack_bits
from slimtorch.formats.state import (
    QuantState,
    code_range,
    codebook_state,
    from_matrix,
    to_matrix,
)

log = logging.getLogger(__name__)

Parts = dict[str, torch.Tensor]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dtype


def parts_bytes(parts: Parts) -> int:
    """Bytes of the raw data of ``parts`` (what they take in the safetensors file)."""
    return sum(t.numel() * t.element_size() for t in parts.values())


def code_offset(q: QuantState) -> int:
    """The smallest code: binary/ternary codes start at 0 whatever ``signed`` says."""
    if q.scheme in ("binary", "ternary", "codebook", "float"):
        return 0
    return code_range(q.bits, q.signed)[0]


def smallest_int(t: torch.Tensor) -> torch.dtype:
    lo, hi = (int(t.min()), int(t.max())) if t.numel() else (0, 0)
    for dtype in (torch.int8, torch.uint8, torch.int16):
        info = torch.iinfo(dtype)
        if info.min <= lo and hi <= info.max:
            return dtype
    return torch.int32


def encode_zero_point(zp: torch.Tensor) -> torch.Tensor:
    """Whole zero points as the smallest integer dtype; fractional ones (HQQ) as float16 when
    exact, else float32."""
    if not zp.is_floating_point():
        return zp.to(smallest_int(zp)).contiguous()
    zp = zp.to(torch.float32)
    half = zp.to(torch.float16)
    return (half if torch.equal(half.to(torch.float32), zp) else zp).contiguous().clone()


def check_code_range(codes: torch.Tensor, q: QuantState, name: str) -> None:
    """ValueError unless every code lies in the ``q.bits``-bit range of ``q``'s scheme."""
    offset = code_offset(q)
    top = offset + 2**q.bits - 1
    if codes.numel() and (int(codes.min()) < offset or int(codes.max()) > top):
        raise ValueError(
            f"{name}: quantization codes span [{int(codes.min())}, {int(codes.max())}],"
            f" outside [{offset}, {top}] of {q.bits}-bit {q.scheme} codes"
        )


def unsigned_codes(codes: torch.Tensor, q: QuantState, name: str) -> torch.Tensor:
    """``codes`` (flat, range-checked) shifted to unsigned symbols ``code - code_offset(q)``:
    uint8 up to 8 bits (they lie in ``[0, 2**bits)``), int32 above. A new tensor, built with
    one int16 temporary (an int64 route took 8 bytes per weight, twice)."""
    check_code_range(codes, q, name)
    offset = code_offset(q)
    if q.bits > 8:
        return codes.reshape(-1).to(torch.int32) - offset
    shifted = codes.reshape(-1).to(torch.int16, copy=True)
    if offset:
        shifted.sub_(offset)
    return shifted.to(torch.uint8)


def encode_codes(codes: torch.Tensor, q: QuantState, name: str) -> torch.Tensor:
    shifted = unsigned_codes(codes, q, name)
    if q.bits <= 8:
        return pack_bits(shifted, q.bits)
    return shifted


def _scale_codes(q: QuantState, scale: torch.Tensor, name: str) -> torch.Tensor | None:
    """The 1-byte codes of a float state's scales (E8M0 or E4M3), or None (with a warning)
    where a scale is not exactly representable in ``q.scale_format``."""
    try:
        if q.scale_format == "e8m0":
            codes = floats.encode_e8m0(scale)
            back = floats.decode_e8m0(codes)
        else:
            codes = floats.encode_e4m3(scale)
            back = floats.decode_e4m3(codes)
    except ValueError:
        back, codes = None, None
    if back is not None and codes is not None and torch.equal(back, scale):
        return codes
    log.warning(
        "%s: scale_format is %s but the scales are not all exactly representable in it;"
        " storing them as float32 so the saved values stay exact",
        name,
        q.scale_format,
    )
    return None


def encode_scale(q: QuantState, name: str) -> torch.Tensor:
    scale = q.scale.to(torch.float32).contiguous()
    if q.scheme == "float" and q.scale_format is not None:
        codes = _scale_codes(q, scale, name)
        if codes is not None:
            return codes
    if q.scale_dtype == "float16":
        half = scale.to(torch.float16)
        if torch.equal(half.to(torch.float32), scale):
            return half
        log.warning(
            "%s: scale_dtype is float16 but the scales are not exactly representable in"
            " float16; storing them as float32 so the saved values stay exact",
            name,
        )
    return scale.clone()


def encode_quant(
    q: QuantState, mask: torch.Tensor | None, kept_only: bool, name: str
) -> tuple[str, Parts]:
    codes = q.codes.reshape(-1)
    if mask is not None and kept_only:
        codes = codes[mask]
    parts = {"codes": encode_codes(codes, q, name), **quant_params(q, name)}
    if mask is not None:
        parts["mask"] = pack_mask(mask)
    return ("quant-bitmask" if kept_only else "quant"), parts


def quant_meta(q: QuantState | None) -> dict[str, Any]:
    if q is None:
        return {}
    if q.scheme == "codebook":
        assert q.codebook is not None
        return {
            "bits": q.bits,
            "scheme": q.scheme,
            "codes_dtype": dtype_name(q.codes.dtype),
            "codebook_size": int(q.codebook.numel()),
        }
    meta = {
        "bits": q.bits,
        "scheme": q.scheme,
        "granularity": q.granularity,
        "group_size": q.group_size,
        "signed": q.signed,
        "scale_dtype": q.scale_dtype,
        "codes_dtype": dtype_name(q.codes.dtype),
    }
    if q.scheme == "float":
        meta.update(element=q.element, scale_format=q.scale_format)
    return meta


def codebook_parts(
    q: QuantState, name: str, shared: dict[int, str] | None, meta: dict[str, Any]
) -> Parts:
    assert q.codebook is not None
    key = q.codebook.untyped_storage().data_ptr()
    if shared is not None and key in shared:
        meta["codebook_ref"] = shared[key]
        return {}
    if shared is not None:
        shared[key] = name
    return {"codebook": q.codebook.detach().cpu().to(torch.float32).contiguous().clone()}


def quant_params(q: QuantState, name: str) -> Parts:
    parts = {"scale": encode_scale(q, name)}
    zp = q.zero_point
    if zp.numel() and bool((zp != 0).any()):
        parts["zero_point"] = encode_zero_point(zp)
    if q.scheme == "float" and q.global_scale is not None:
        parts["global_scale"] = q.global_scale.detach().cpu().to(torch.float32).reshape(1).clone()
    return parts


def side_parts(q: QuantState | None, name: str) -> Parts:
    """The parts every encoding of ``q`` stores besides its codes (scales or the codebook)."""
    if q is None:
        return {}
    if q.scheme == "codebook":
        assert q.codebook is not None
        return {"codebook": q.codebook.detach().cpu().to(torch.float32).contiguous().clone()}
    return quant_params(q, name)


def zero_codes(q: QuantState, shape: list[int]) -> torch.Tensor:
    """Codes whose value is zero (affine: the zero point), filling pruned positions."""
    matrix = to_matrix(torch.empty(shape, dtype=torch.int32))
    if q.scheme in ("binary", "codebook"):
        return torch.zeros(matrix.numel(), dtype=torch.int32)
    if q.scheme == "ternary":
        return torch.ones(matrix.numel(), dtype=torch.int32)
    zero = q.zero_point.round() if q.zero_point.is_floating_point() else q.zero_point
    zp = q.expand(zero.to(torch.int32), matrix.shape[1]).expand(matrix.shape)
    return from_matrix(zp.contiguous(), shape).reshape(-1).to(torch.int32)


def quant_header(meta: dict[str, Any], parts: Parts) -> QuantState:
    """The quantization state of ``meta`` without its codes."""
    if meta["scheme"] == "codebook":
        codebook = parts["codebook"]
        if codebook.numel() > 2 ** int(meta["bits"]):
            raise ValueError(f"codebook of {codebook.numel()} values for {meta['bits']}-bit codes")
        return codebook_state(
            torch.empty(0, dtype=torch.int32), codebook.to(torch.float32), int(meta["bits"])
        )
    scale = _decoded_scale(meta, parts["scale"])
    zp = parts.get("zero_point")
    return QuantState(
        scheme=meta["scheme"],
        bits=int(meta["bits"]),
        signed=bool(meta["signed"]),
        granularity=meta["granularity"],
        codes=torch.empty(0, dtype=torch.int32),
        scale=scale,
        zero_point=(zp.to(torch.float32) if zp.is_floating_point() else zp.to(torch.int32))
        if zp is not None
        else torch.zeros_like(scale, dtype=torch.int32),
        group_size=meta.get("group_size"),
        scale_dtype=meta.get("scale_dtype", "float32"),
        **_float_fields(meta, parts),
    )


def _decoded_scale(meta: dict[str, Any], stored: torch.Tensor) -> torch.Tensor:
    """float32 scales of a stored ``scale`` part: 1-byte codes (uint8) of a float state's
    ``scale_format`` are decoded, anything else is cast."""
    if meta.get("scheme") != "float" or stored.dtype != torch.uint8:
        return stored.to(torch.float32)
    if meta.get("scale_format") == "e8m0":
        return floats.decode_e8m0(stored)
    if meta.get("scale_format") == "e4m3":
        return floats.decode_e4m3(stored)
    raise ValueError(f"uint8 scales with scale_format {meta.get('scale_format')!r}")


def _float_fields(meta: dict[str, Any], parts: Parts) -> dict[str, Any]:
    if meta.get("scheme") != "float":
        return {}
    if meta.get("element") not in ("e4m3", "e2m1"):
        raise ValueError(f"float codes of unknown element format {meta.get('element')!r}")
    glob = parts.get("global_scale")
    return {
        "element": meta["element"],
        "scale_format": meta.get("scale_format"),
        "global_scale": None if glob is None else glob.to(torch.float32).reshape(1),
    }


def decode_quant(meta: dict[str, Any], parts: Parts, mask: torch.Tensor | None) -> QuantState:
    shape, numel, bits = list(meta["shape"]), int(meta["numel"]), int(meta["bits"])
    q = quant_header(meta, parts)
    kept_only = meta["encoding"] in ("quant-bitmask", "coded") and mask is not None
    if meta["encoding"] == "quant-bitmask" and mask is None:
        raise ValueError("quant-bitmask encoding without a mask part")
    count = int(mask.sum()) if kept_only and mask is not None else numel
    if meta["encoding"] == "coded":
        raw = coded.decode_codes(meta, parts, bits, count)
    else:
        stored = parts["codes"]
        raw = unpack_bits(stored, bits, count) if bits <= 8 else stored.reshape(-1)[:count]
    if raw.numel() != count:
        raise ValueError(f"codes part holds {raw.numel()} codes, expected {count}")
    codes = raw.to(torch.int32) + code_offset(q)
    if q.scheme == "codebook" and count and int(codes.max()) >= q.codebook.numel():  # type: ignore[union-attr]
        raise ValueError(f"codebook index {int(codes.max())} past the codebook's end")
    if kept_only and mask is not None:
        full = zero_codes(q, shape)
        full[mask] = codes
        codes = full
    q.codes = codes.reshape(shape).to(dtype_from_name(meta["codes_dtype"]))
    return q
