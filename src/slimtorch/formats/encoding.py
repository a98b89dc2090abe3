"""How one tensor is stored: the smallest of four encodings, chosen per tensor.

- ``dense``: the tensor as is (part ``data``).
- ``bitmask``: ``mask`` (1 bit per element, see :mod:`slimtorch.formats.packing`) and ``values``,
  the kept elements in the tensor's dtype. Without a state the mask is ``tensor != 0``; a state's
  pruning mask is used as is (and restored on load).
- ``quant``: ``codes`` shifted to unsigned (``code - qmin``) and packed at ``bits`` bits, ``scale``
  (fp16 when the state asks for it and that is exact, else fp32), ``zero_point`` only when some
  is nonzero (smallest integer dtype), and ``mask`` when the state has one.
- ``quant-bitmask``: ``mask`` and the packed codes of the kept positions only, plus scales.

Quantized or masked weights only use the encodings that keep their state, so a loaded model can
be saved again. Decoding returns exactly (``torch.equal``) what
:func:`slimtorch.formats.state.effective_weight` gives for the state.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from typing import Any

import torch

from slimtorch.formats.packing import pack_bits, pack_mask, unpack_bits, unpack_mask
from slimtorch.formats.state import (
    QuantState,
    WeightState,
    code_range,
    effective_weight,
    from_matrix,
    to_matrix,
)

log = logging.getLogger(__name__)

Parts = dict[str, torch.Tensor]
ENCODINGS = ("dense", "bitmask", "quant", "quant-bitmask")
_MASKABLE = {
    torch.float16,
    torch.bfloat16,
    torch.float32,
    torch.float64,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.uint8,
    torch.bool,
}


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


def _code_offset(q: QuantState) -> int:
    """The smallest code: binary/ternary codes start at 0 whatever ``signed`` says."""
    if q.scheme in ("binary", "ternary"):
        return 0
    return code_range(q.bits, q.signed)[0]


def _smallest_int(t: torch.Tensor) -> torch.dtype:
    lo, hi = (int(t.min()), int(t.max())) if t.numel() else (0, 0)
    for dtype in (torch.int8, torch.uint8, torch.int16):
        info = torch.iinfo(dtype)
        if info.min <= lo and hi <= info.max:
            return dtype
    return torch.int32


def _checked_state(state: WeightState, shape: torch.Size, name: str) -> WeightState:
    """A CPU copy of ``state`` with mask and codes checked against (and shaped like) ``shape``."""
    numel = shape.numel()
    q = state.quant
    if q is not None:
        if q.codes.numel() != numel:
            raise ValueError(f"{name}: codes have {q.codes.numel()} elements, the tensor {numel}")
        q = replace(
            q,
            codes=q.codes.detach().cpu().reshape(shape),
            scale=q.scale.detach().cpu(),
            zero_point=q.zero_point.detach().cpu(),
        )
    mask = None
    if state.mask is not None:
        if state.mask.numel() != numel:
            raise ValueError(f"{name}: mask has {state.mask.numel()} elements, the tensor {numel}")
        mask = state.mask.detach().cpu().to(torch.bool).reshape(shape)
    return WeightState(mask=mask, quant=q, extra=dict(state.extra))


def _encode_bitmask(target: torch.Tensor, mask: torch.Tensor) -> tuple[str, Parts]:
    flat = target.reshape(-1)
    parts = {"mask": pack_mask(mask)}
    values = flat[mask]
    if target.dtype != torch.bool or not bool(values.all()):
        parts["values"] = values.contiguous()
    return "bitmask", parts


def _encode_codes(codes: torch.Tensor, q: QuantState, name: str) -> torch.Tensor:
    offset = _code_offset(q)
    top = offset + 2**q.bits - 1
    if codes.numel() and (int(codes.min()) < offset or int(codes.max()) > top):
        raise ValueError(
            f"{name}: quantization codes span [{int(codes.min())}, {int(codes.max())}],"
            f" outside [{offset}, {top}] of {q.bits}-bit {q.scheme} codes"
        )
    shifted = codes - offset
    if q.bits <= 8:
        return pack_bits(shifted, q.bits)
    return shifted.to(torch.int32)


def _encode_scale(q: QuantState, name: str) -> torch.Tensor:
    scale = q.scale.to(torch.float32).contiguous()
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


def _encode_quant(
    q: QuantState, mask: torch.Tensor | None, kept_only: bool, name: str
) -> tuple[str, Parts]:
    codes = q.codes.reshape(-1).to(torch.int32)
    if mask is not None and kept_only:
        codes = codes[mask]
    parts = {"codes": _encode_codes(codes, q, name), "scale": _encode_scale(q, name)}
    if mask is not None:
        parts["mask"] = pack_mask(mask)
    zp = q.zero_point
    if zp.numel() and bool((zp != 0).any()):
        parts["zero_point"] = zp.to(_smallest_int(zp)).contiguous()
    return ("quant-bitmask" if kept_only else "quant"), parts


def _json_extra(extra: dict[str, object], name: str) -> dict[str, object]:
    out = {}
    for key, value in extra.items():
        try:
            json.dumps(value)
        except (TypeError, ValueError):
            log.warning("%s: state extra %r is not JSON-serializable; not saved", name, key)
            continue
        out[key] = value
    return out


def _quant_meta(q: QuantState | None) -> dict[str, Any]:
    return {
        "bits": q.bits if q else None,
        "scheme": q.scheme if q else None,
        "granularity": q.granularity if q else None,
        "group_size": q.group_size if q else None,
        "signed": q.signed if q else None,
        "scale_dtype": q.scale_dtype if q else None,
        "codes_dtype": dtype_name(q.codes.dtype) if q else None,
    }


def _candidates(
    target: torch.Tensor, state: WeightState | None, name: str
) -> list[tuple[str, Parts]]:
    """Encodings that can hold ``target`` and keep ``state``; preferred first on ties."""
    q = state.quant if state else None
    mask = state.mask.reshape(-1) if state and state.mask is not None else None
    if q is not None:
        found = [_encode_quant(q, mask, False, name)]
        if mask is not None:
            found.append(_encode_quant(q, mask, True, name))
        return found
    if mask is not None:
        return [_encode_bitmask(target, mask)]
    found = [("dense", {"data": target})]
    if target.dtype in _MASKABLE and target.numel() > 0:
        found.append(_encode_bitmask(target, target.reshape(-1) != 0))
    return found


def encode_tensor(
    tensor: torch.Tensor, state: WeightState | None = None, name: str = "tensor"
) -> tuple[Parts, dict[str, Any]]:
    """Encode ``tensor`` (with its compression ``state``) as the smallest applicable encoding.

    Returns the parts to store and a JSON-able meta dict; ``name`` is only used in messages.
    """
    t = tensor.detach().cpu()
    if t.layout != torch.strided:
        raise ValueError(f"{name}: {t.layout} tensors cannot be saved; convert with .to_dense()")
    if state is not None:
        state = _checked_state(state, t.shape, name)
    target = t
    if state is not None and (state.mask is not None or state.quant is not None):
        target = effective_weight(state, t)
        if not torch.equal(target, t):
            log.warning(
                "%s: the tensor differs from the values of its compression state; saving the"
                " state's values (re-apply the state after changing the weight)",
                name,
            )
    encoding, parts = min(_candidates(target, state, name), key=lambda c: parts_bytes(c[1]))
    parts = {k: v.contiguous() for k, v in parts.items()}
    meta: dict[str, Any] = {
        "encoding": encoding,
        "shape": list(t.shape),
        "dtype": dtype_name(t.dtype),
        "numel": t.numel(),
        "nonzero": int((target != 0).sum()),
        "bytes": parts_bytes(parts),
        **_quant_meta(state.quant if state else None),
        "has_state": state is not None,
        "has_mask": state is not None and state.mask is not None,
        "parts": sorted(parts),
    }
    if state is not None and state.extra:
        meta["extra"] = _json_extra(state.extra, name)
    return parts, meta


def _zero_codes(q: QuantState, shape: list[int]) -> torch.Tensor:
    """Codes whose value is zero (affine: the zero point), filling pruned positions."""
    matrix = to_matrix(torch.empty(shape, dtype=torch.int32))
    if q.scheme == "binary":
        return torch.zeros(matrix.numel(), dtype=torch.int32)
    if q.scheme == "ternary":
        return torch.ones(matrix.numel(), dtype=torch.int32)
    zp = q.expand(q.zero_point.to(torch.int32), matrix.shape[1]).expand(matrix.shape)
    return from_matrix(zp.contiguous(), shape).reshape(-1).to(torch.int32)


def _decode_quant(meta: dict[str, Any], parts: Parts, mask: torch.Tensor | None) -> QuantState:
    shape, numel, bits = list(meta["shape"]), int(meta["numel"]), int(meta["bits"])
    scale = parts["scale"].to(torch.float32)
    zp = parts.get("zero_point")
    q = QuantState(
        scheme=meta["scheme"],
        bits=bits,
        signed=bool(meta["signed"]),
        granularity=meta["granularity"],
        codes=torch.empty(0, dtype=torch.int32),
        scale=scale,
        zero_point=zp.to(torch.int32)
        if zp is not None
        else torch.zeros_like(scale, dtype=torch.int32),
        group_size=meta["group_size"],
        scale_dtype=meta["scale_dtype"],
    )
    kept_only = meta["encoding"] == "quant-bitmask"
    if kept_only and mask is None:
        raise ValueError("quant-bitmask encoding without a mask part")
    count = int(mask.sum()) if kept_only and mask is not None else numel
    stored = parts["codes"]
    raw = unpack_bits(stored, bits, count) if bits <= 8 else stored.reshape(-1)[:count]
    if raw.numel() != count:
        raise ValueError(f"codes part holds {raw.numel()} codes, expected {count}")
    codes = raw.to(torch.int32) + _code_offset(q)
    if kept_only and mask is not None:
        full = _zero_codes(q, shape)
        full[mask] = codes
        codes = full
    q.codes = codes.reshape(shape).to(dtype_from_name(meta["codes_dtype"]))
    return q


def decode_tensor(meta: dict[str, Any], parts: Parts) -> tuple[torch.Tensor, WeightState | None]:
    """Inverse of :func:`encode_tensor`: the effective values and the state (or None).

    Raises KeyError/ValueError on malformed meta or parts (the artifact reader wraps these).
    """
    encoding = meta["encoding"]
    if encoding not in ENCODINGS:
        raise ValueError(f"unknown encoding {encoding!r} (known: {', '.join(ENCODINGS)})")
    shape, numel = list(meta["shape"]), int(meta["numel"])
    dtype = dtype_from_name(meta["dtype"])
    mask = unpack_mask(parts["mask"], numel) if "mask" in parts else None
    state = None
    if meta.get("has_state"):
        state = WeightState(extra=dict(meta.get("extra") or {}))
        if meta.get("has_mask"):
            state.mask = None if mask is None else mask.reshape(shape)
    if encoding == "dense":
        return parts["data"].reshape(shape), state
    if encoding == "bitmask":
        if mask is None:
            raise ValueError("bitmask encoding without a mask part")
        values = parts.get("values", torch.ones(int(mask.sum()), dtype=torch.bool))
        if values.numel() != int(mask.sum()):
            raise ValueError(
                f"values part holds {values.numel()} values, mask keeps {int(mask.sum())}"
            )
        out = torch.zeros(numel, dtype=dtype)
        out[mask] = values.to(dtype)
        return out.reshape(shape), state
    if state is None:
        state = WeightState()
    state.quant = _decode_quant(meta, parts, mask)
    return effective_weight(state, torch.empty(shape, dtype=dtype)), state
