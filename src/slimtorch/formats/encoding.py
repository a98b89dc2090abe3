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

from slimtorch.formats import coded
from slimtorch.formats.packing import pack_bits, pack_mask, unpack_bits, unpack_mask
from slimtorch.formats.state import (
    QuantState,
    WeightState,
    code_range,
    codebook_state,
    effective_weight,
    from_matrix,
    to_matrix,
)

log = logging.getLogger(__name__)

Parts = dict[str, torch.Tensor]
ENCODINGS = ("dense", "bitmask", "quant", "quant-bitmask", "coded")
ENTROPY = ("none", "huffman")
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
    if q.scheme in ("binary", "ternary", "codebook"):
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
    return {
        "bits": q.bits,
        "scheme": q.scheme,
        "granularity": q.granularity,
        "group_size": q.group_size,
        "signed": q.signed,
        "scale_dtype": q.scale_dtype,
        "codes_dtype": dtype_name(q.codes.dtype),
    }


def _candidates(
    target: torch.Tensor, state: WeightState | None, name: str
) -> list[tuple[str, Parts]]:
    """The fixed-layout encodings that can hold ``target`` and keep ``state``; preferred first."""
    q = state.quant if state else None
    mask = state.mask.reshape(-1) if state and state.mask is not None else None
    if q is not None:
        if q.scheme == "codebook":
            return []
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


def _coded_inputs(
    target: torch.Tensor, state: WeightState | None
) -> tuple[torch.Tensor | None, int, torch.Tensor | None] | None:
    """``(unsigned codes or None, bits, kept mask or None)`` for the ``coded`` encoding."""
    q = state.quant if state else None
    mask = state.mask if state and state.mask is not None else None
    if q is not None:
        codes = q.codes.reshape(-1).to(torch.int64) - _code_offset(q)
        return codes, q.bits, mask
    if target.dtype not in _MASKABLE or target.numel() == 0 or target.dtype == torch.bool:
        return None
    return None, 0, mask if mask is not None else target != 0


def _codebook_parts(
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


def _quant_params(q: QuantState, name: str) -> Parts:
    parts = {"scale": _encode_scale(q, name)}
    zp = q.zero_point
    if zp.numel() and bool((zp != 0).any()):
        parts["zero_point"] = zp.to(_smallest_int(zp)).contiguous()
    return parts


def _side_parts(q: QuantState | None, name: str) -> Parts:
    """The parts every encoding of ``q`` stores besides its codes (scales or the codebook)."""
    if q is None:
        return {}
    if q.scheme == "codebook":
        assert q.codebook is not None
        return {"codebook": q.codebook.detach().cpu().to(torch.float32).contiguous().clone()}
    return _quant_params(q, name)


def _best(
    target: torch.Tensor, state: WeightState | None, name: str, entropy: str
) -> tuple[str, Parts, dict[str, Any]]:
    """The smallest encoding (fixed layouts and coded plans), built. Ties keep a fixed layout."""

    def cost(parts: Parts) -> int:
        return parts_bytes(parts) + coded.PART_OVERHEAD * len(parts)

    q = state.quant if state else None
    fixed = min(_candidates(target, state, name), key=lambda c: cost(c[1]), default=None)
    inputs = _coded_inputs(target, state)
    plan = None
    if inputs is not None and (q is None or q.bits <= 8):
        codes, bits, mask = inputs
        if codes is not None:
            _encode_codes(codes + _code_offset(q), q, name)  # type: ignore[arg-type]
        side = cost(_side_parts(q, name))
        found = [
            p
            for p in coded.plans(codes, bits, mask, target.element_size(), entropy)
            if fixed is None or p.label not in ("packed", "raw")  # those are "quant"/"dense"
        ]
        plan = found[0] if found else None
        if plan is not None and fixed is not None and cost(fixed[1]) <= plan.size + side:
            plan = None
    if plan is None:
        if fixed is None:
            raise ValueError(f"{name}: no encoding can store this tensor")
        return fixed[0], fixed[1], {}
    assert inputs is not None
    codes, bits, mask = inputs
    parts, extra = coded.encode(plan, codes, bits, mask, None if codes is not None else target)
    return "coded", parts, extra


def encode_tensor(
    tensor: torch.Tensor,
    state: WeightState | None = None,
    name: str = "tensor",
    entropy: str = "none",
    shared: dict[int, str] | None = None,
) -> tuple[Parts, dict[str, Any]]:
    """Encode ``tensor`` (with its compression ``state``) as the smallest applicable encoding.

    ``entropy="huffman"`` lets symbol streams be Huffman coded. ``shared`` maps the storage of
    codebooks already written to the tensor that holds them (cross-layer sharing: stored once).
    Returns the parts to store and a JSON-able meta dict; ``name`` is only used in messages.
    """
    if entropy not in ENTROPY:
        raise ValueError(f"unknown entropy coding {entropy!r} (known: {', '.join(ENTROPY)})")
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
    encoding, parts, extra = _best(target, state, name, entropy)
    q = state.quant if state else None
    if encoding == "coded" and q is not None:
        if q.scheme == "codebook":
            parts.update(_codebook_parts(q, name, shared, extra))
        else:
            parts.update(_quant_params(q, name))
    parts = {k: v.contiguous() for k, v in parts.items()}
    meta: dict[str, Any] = {
        "encoding": encoding,
        "shape": list(t.shape),
        "dtype": dtype_name(t.dtype),
        "numel": t.numel(),
        "nonzero": int((target != 0).sum()),
        "bytes": parts_bytes(parts),
        **_quant_meta(q),
        "has_state": state is not None or None,
        "has_mask": (state is not None and state.mask is not None) or None,
        "parts": sorted(parts),
        **extra,
    }
    meta = {k: v for k, v in meta.items() if v is not None}  # absent keys read as None/False
    if state is not None and state.extra:
        meta["extra"] = _json_extra(state.extra, name)
    return parts, meta


def _zero_codes(q: QuantState, shape: list[int]) -> torch.Tensor:
    """Codes whose value is zero (affine: the zero point), filling pruned positions."""
    matrix = to_matrix(torch.empty(shape, dtype=torch.int32))
    if q.scheme in ("binary", "codebook"):
        return torch.zeros(matrix.numel(), dtype=torch.int32)
    if q.scheme == "ternary":
        return torch.ones(matrix.numel(), dtype=torch.int32)
    zp = q.expand(q.zero_point.to(torch.int32), matrix.shape[1]).expand(matrix.shape)
    return from_matrix(zp.contiguous(), shape).reshape(-1).to(torch.int32)


def _quant_header(meta: dict[str, Any], parts: Parts) -> QuantState:
    """The quantization state of ``meta`` without its codes."""
    if meta["scheme"] == "codebook":
        codebook = parts["codebook"]
        if codebook.numel() > 2 ** int(meta["bits"]):
            raise ValueError(f"codebook of {codebook.numel()} values for {meta['bits']}-bit codes")
        return codebook_state(
            torch.empty(0, dtype=torch.int32), codebook.to(torch.float32), int(meta["bits"])
        )
    scale = parts["scale"].to(torch.float32)
    zp = parts.get("zero_point")
    return QuantState(
        scheme=meta["scheme"],
        bits=int(meta["bits"]),
        signed=bool(meta["signed"]),
        granularity=meta["granularity"],
        codes=torch.empty(0, dtype=torch.int32),
        scale=scale,
        zero_point=zp.to(torch.int32)
        if zp is not None
        else torch.zeros_like(scale, dtype=torch.int32),
        group_size=meta.get("group_size"),
        scale_dtype=meta.get("scale_dtype", "float32"),
    )


def _decode_quant(meta: dict[str, Any], parts: Parts, mask: torch.Tensor | None) -> QuantState:
    shape, numel, bits = list(meta["shape"]), int(meta["numel"]), int(meta["bits"])
    q = _quant_header(meta, parts)
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
    codes = raw.to(torch.int32) + _code_offset(q)
    if q.scheme == "codebook" and count and int(codes.max()) >= q.codebook.numel():  # type: ignore[union-attr]
        raise ValueError(f"codebook index {int(codes.max())} past the codebook's end")
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
    if encoding == "coded":
        mask = coded.decode_mask(meta, parts, shape)
    else:
        mask = unpack_mask(parts["mask"], numel) if "mask" in parts else None
    state = None
    if meta.get("has_state"):
        state = WeightState(extra=dict(meta.get("extra") or {}))
        if meta.get("has_mask"):
            state.mask = None if mask is None else mask.reshape(shape)
    if encoding == "dense":
        return parts["data"].reshape(shape), state
    if encoding == "coded" and meta.get("scheme") is None:
        values = parts["values"]
        if mask is None or values.numel() != int(mask.sum()):
            raise ValueError("coded values do not match the number of kept elements")
        out = torch.zeros(numel, dtype=dtype)
        out[mask] = values.to(dtype)
        return out.reshape(shape), state
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
