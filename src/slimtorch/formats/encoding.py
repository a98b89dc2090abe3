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
from slimtorch.formats.packing import pack_mask, unpack_mask
from slimtorch.formats.quant_parts import (
    codebook_parts,
    decode_quant,
    dtype_from_name,
    dtype_name,
    encode_quant,
    parts_bytes,
    quant_meta,
    quant_params,
    side_parts,
    unsigned_codes,
)
from slimtorch.formats.state import (
    WeightState,
    effective_weight,
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


def _candidates(
    target: torch.Tensor, state: WeightState | None, name: str
) -> list[tuple[str, Parts]]:
    """The fixed-layout encodings that can hold ``target`` and keep ``state``; preferred first."""
    q = state.quant if state else None
    mask = state.mask.reshape(-1) if state and state.mask is not None else None
    if q is not None:
        if q.scheme == "codebook":
            return []
        found = [encode_quant(q, mask, False, name)]
        if mask is not None:
            found.append(encode_quant(q, mask, True, name))
        return found
    if mask is not None:
        return [_encode_bitmask(target, mask)]
    found = [("dense", {"data": target})]
    if target.dtype in _MASKABLE and target.numel() > 0:
        found.append(_encode_bitmask(target, target.reshape(-1) != 0))
    return found


def _coded_inputs(
    target: torch.Tensor, state: WeightState | None, name: str
) -> tuple[torch.Tensor | None, int, torch.Tensor | None] | None:
    """``(unsigned codes or None, bits, kept mask or None)`` for the ``coded`` encoding."""
    q = state.quant if state else None
    mask = state.mask if state and state.mask is not None else None
    if q is not None:  # range-checked; uint8 symbols at <= 8 bits (the only coded case)
        return unsigned_codes(q.codes.reshape(-1), q, name), q.bits, mask
    if target.dtype not in _MASKABLE or target.numel() == 0 or target.dtype == torch.bool:
        return None
    return None, 0, mask if mask is not None else target != 0


def _best(
    target: torch.Tensor, state: WeightState | None, name: str, entropy: str
) -> tuple[str, Parts, dict[str, Any]]:
    """The smallest encoding (fixed layouts and coded plans), built. Ties keep a fixed layout."""

    def cost(parts: Parts) -> int:
        return parts_bytes(parts) + coded.PART_OVERHEAD * len(parts)

    q = state.quant if state else None
    fixed = min(_candidates(target, state, name), key=lambda c: cost(c[1]), default=None)
    plan = None
    inputs = _coded_inputs(target, state, name) if q is None or q.bits <= 8 else None
    if inputs is not None:
        codes, bits, mask = inputs
        side = cost(side_parts(q, name))
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


ROWS_AT_ONCE = 4096


def _compare_by_rows(state: WeightState, t: torch.Tensor) -> tuple[bool, int] | None:
    """For a 2-D affine-quantized weight without a mask: whether ``t`` equals its state's
    values, and how many of those are nonzero, dequantizing :data:`ROWS_AT_ONCE` rows at a time
    (a 113 MB embedding needs no second full-size copy). None where this does not apply."""
    q = state.quant
    if state.mask is not None or q is None or q.scheme != "affine" or t.dim() != 2:
        return None
    rows = t.shape[0]
    if (
        q.scale.dim() != 2
        or q.zero_point.shape != q.scale.shape
        or q.scale.shape[0] not in (1, rows)
    ):
        return None
    same, nonzero = True, 0
    for a in range(0, rows, ROWS_AT_ONCE):
        b = min(a + ROWS_AT_ONCE, rows)
        whole = q.scale.shape[0] == 1  # per tensor: one scale for every row
        scale = q.scale if whole else q.scale[a:b]
        zero_point = q.zero_point if whole else q.zero_point[a:b]
        part = WeightState(quant=replace(q, codes=q.codes[a:b], scale=scale, zero_point=zero_point))
        values = effective_weight(part, t[a:b])
        same = same and torch.equal(values, t[a:b])
        nonzero += int(torch.count_nonzero(values))
    return same, nonzero


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
    target, nonzero = t, None
    if state is not None and (state.mask is not None or state.quant is not None):
        sliced = _compare_by_rows(state, t)
        if sliced is None:
            target = effective_weight(state, t)
            same = torch.equal(target, t)
        else:  # the stored parts never need the values: only the codes (no full-size copy)
            same, nonzero = sliced
        if not same:
            log.warning(
                "%s: the tensor differs from the values of its compression state; saving the"
                " state's values (re-apply the state after changing the weight)",
                name,
            )
    encoding, parts, extra = _best(target, state, name, entropy)
    q = state.quant if state else None
    if encoding == "coded" and q is not None:
        if q.scheme == "codebook":
            parts.update(codebook_parts(q, name, shared, extra))
        else:
            parts.update(quant_params(q, name))
    parts = {k: v.contiguous() for k, v in parts.items()}
    meta: dict[str, Any] = {
        "encoding": encoding,
        "shape": list(t.shape),
        "dtype": dtype_name(t.dtype),
        "numel": t.numel(),
        "nonzero": int(torch.count_nonzero(target)) if nonzero is None else nonzero,
        "bytes": parts_bytes(parts),
        **quant_meta(q),
        "has_state": state is not None or None,
        "has_mask": (state is not None and state.mask is not None) or None,
        "parts": sorted(parts),
        **extra,
    }
    meta = {k: v for k, v in meta.items() if v is not None}  # absent keys read as None/False
    if state is not None and state.extra:
        meta["extra"] = _json_extra(state.extra, name)
    return parts, meta


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
    state.quant = decode_quant(meta, parts, mask)
    return effective_weight(state, torch.empty(shape, dtype=dtype)), state
