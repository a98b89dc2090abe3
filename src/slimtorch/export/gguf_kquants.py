"""llama.cpp's k-quant blocks (Q4_K, Q5_K, Q6_K) and importance-weighted Q5_0 / Q8_0, encoded
from float weights (pure maths, numpy; no file IO). The ``gguf`` package decodes these types
but does not encode them; this module does, and its output decodes bit-exactly with
``gguf.quants.dequantize`` (tests/export/test_gguf_kquants.py).

A super-block holds 256 consecutive weights of a row:

- ``Q4_K`` (144 bytes: fp16 ``d``, fp16 ``dmin``, 12 bytes of 6-bit scales and mins, 128 bytes of
  nibbles): 8 sub-blocks of 32, ``x = (d * sc_j) * q - (dmin * m_j)``, ``q`` in 0..15,
  ``sc_j``, ``m_j`` in 0..63;
- ``Q5_K`` (176 bytes: as Q4_K plus 32 bytes of fifth bits): ``q`` in 0..31;
- ``Q6_K`` (210 bytes: 128 bytes of low nibbles, 64 bytes of high 2-bit pairs, 16 int8 scales,
  fp16 ``d``): 16 sub-blocks of 16, ``x = (d * sc_j) * (q - 32)``, ``q`` in 0..63.

Rounding follows the idea of llama.cpp's ``make_qkx2/3_quants`` / ``make_qx_quants`` /
``make_qp_quants`` (written here from their description, vectorized over all sub-blocks): each
sub-block's scale (and min) is chosen among a sweep of candidate scales by a weighted
least-squares fit, minimizing ``sum_i w_i (x_i - x^_i)^2``; the sub-block scales are then
quantized to 6 or 8 bits against the super-block's fp16 ``d`` by the same weighted criterion,
and the codes are rounded again on the final (quantized) scales. The weights ``w`` are the
importance of each input column (llama.cpp's imatrix: the mean squared activation of that
input, over calibration data) times ``sqrt(sigma^2 + x_i^2)``; without an importance vector,
llama.cpp's defaults (``rms + |x_i|`` for Q4_K / Q5_K, ``x_i^2`` for Q6_K).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

QK_K = 256
K_TYPES = ("Q4_K", "Q5_K", "Q6_K")
BLOCK_BYTES = {"Q4_K": 144, "Q5_K": 176, "Q6_K": 210, "Q5_0": 22, "Q8_0": 34}
BLOCK_SIZE = {"Q4_K": QK_K, "Q5_K": QK_K, "Q6_K": QK_K, "Q5_0": 32, "Q8_0": 32}
_CHUNK = 4096  # super-blocks encoded at a time (bounded temporaries)
_EPS = 1e-15


@dataclass
class Encoded:
    """One weight as blocks: ``data`` uint8 ``[rows, cols / block * bytes]``; ``values`` the
    float32 ``[rows, cols]`` they decode to."""

    ggml_type: str
    data: np.ndarray
    values: np.ndarray


def _f16(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=np.float32).astype(np.float16)


def fit_affine(
    x: np.ndarray, w: np.ndarray, nmax: int, sweep: tuple[float, float, int]
) -> tuple[np.ndarray, np.ndarray]:
    """Per row of ``x`` ``[n, k]``: ``(scale, offset)`` with ``x ~ scale * L - offset``, ``L`` in
    0..nmax, offset >= 0, minimizing the ``w``-weighted squared error over a sweep of candidate
    scales ``(nmax + rmin + rdelta * s) / (max - min)``, ``s`` = 0..nstep (``sweep``), each
    refitted by weighted least squares (and the plain min-max grid)."""
    rmin, rdelta, nstep = sweep
    lo = np.minimum(x.min(axis=1), 0.0)
    span = x.max(axis=1) - lo
    flat = span <= 0
    span = np.where(flat, 1.0, span)
    sw, swx = w.sum(axis=1), (w * x).sum(axis=1)
    best_scale, best_min = span / nmax, lo
    step = np.clip(np.rint((x - lo[:, None]) * (nmax / span)[:, None]), 0, nmax)
    best_err = (w * (best_scale[:, None] * step + lo[:, None] - x) ** 2).sum(axis=1)
    for s in range(nstep + 1):
        iscale = (nmax + rmin + rdelta * s) / span
        levels = np.clip(np.rint((x - lo[:, None]) * iscale[:, None]), 0, nmax)
        sl, sl2 = (w * levels).sum(axis=1), (w * levels * levels).sum(axis=1)
        sxl = (w * levels * x).sum(axis=1)
        det = sw * sl2 - sl * sl
        ok = det > 0
        safe = np.where(ok, det, 1.0)
        scale = (sw * sxl - swx * sl) / safe
        mn = (sl2 * swx - sl * sxl) / safe
        pos = mn > 0
        scale = np.where(pos, sxl / np.where(sl2 > 0, sl2, 1.0), scale)
        mn = np.where(pos, 0.0, mn)
        err = (w * (scale[:, None] * levels + mn[:, None] - x) ** 2).sum(axis=1)
        better = ok & (err < best_err)
        best_err = np.where(better, err, best_err)
        best_scale = np.where(better, scale, best_scale)
        best_min = np.where(better, mn, best_min)
    best_scale = np.where(flat, 0.0, best_scale)
    return best_scale.astype(np.float32), (-best_min).astype(np.float32)


def fit_symmetric(x: np.ndarray, w: np.ndarray, nmax: int) -> np.ndarray:
    """Per row of ``x`` ``[n, k]``: the signed scale of ``x ~ scale * L``, ``L`` in
    -nmax..nmax-1 (the largest-magnitude weight on the extra negative code), chosen among 19
    candidate scales around ``-max / nmax`` by the ``w``-weighted least-squares fit."""
    big = np.take_along_axis(x, np.abs(x).argmax(axis=1)[:, None], axis=1)[:, 0]
    zero = np.abs(big) < _EPS
    big = np.where(zero, 1.0, big)
    best_scale = np.zeros(len(x), dtype=np.float64)
    best = np.full(len(x), -np.inf)
    for s in range(-9, 10):
        iscale = -(nmax + 0.1 * s) / big
        levels = np.clip(np.rint(x * iscale[:, None]), -nmax, nmax - 1)
        sxl = (w * x * levels).sum(axis=1)
        sl2 = (w * levels * levels).sum(axis=1)
        ok = sl2 > 0
        scale = sxl / np.where(ok, sl2, 1.0)
        gain = scale * sxl  # the error reduction of this fit
        better = ok & (gain > best)
        best = np.where(better, gain, best)
        best_scale = np.where(better, scale, best_scale)
    return np.where(zero, 0.0, best_scale).astype(np.float32)


def fit_positive(x: np.ndarray, w: np.ndarray, nmax: int) -> np.ndarray:
    """Per row of non-negative ``x`` ``[n, k]``: the scale of ``x ~ scale * L``, ``L`` in
    0..nmax, the best ``w``-weighted of 9 candidates around ``max / nmax``, refitted."""
    big = x.max(axis=1)
    zero = big <= 0
    big = np.where(zero, 1.0, big)
    best_err = np.full(len(x), np.inf)
    best_iscale = nmax / big
    for s in range(-4, 5):
        iscale = (nmax + 0.1 * s) / big
        levels = np.minimum(nmax, np.rint(x * iscale[:, None]))
        err = (w * (x - levels / iscale[:, None]) ** 2).sum(axis=1)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_iscale = np.where(better, iscale, best_iscale)
    levels = np.minimum(nmax, np.rint(x * best_iscale[:, None]))
    sl2 = (w * levels * levels).sum(axis=1)
    scale = np.where(sl2 > 0, (w * x * levels).sum(axis=1) / np.where(sl2 > 0, sl2, 1), 0.0)
    return np.where(zero, 0.0, scale).astype(np.float32)


def _weights(x: np.ndarray, qw: np.ndarray | None, default: str, sigma_k: float) -> np.ndarray:
    """Per-weight rounding importance of super-blocks ``x`` ``[n, 256]`` (see the docstring)."""
    sigma2 = sigma_k * (x * x).mean(axis=1, keepdims=True)
    if qw is not None:
        return qw * np.sqrt(sigma2 + x * x)
    if default == "square":
        return x * x
    sub = x.reshape(len(x), -1, 32)
    rms = np.sqrt((sub * sub).mean(axis=2, keepdims=True))
    return (rms + np.abs(sub)).reshape(x.shape)


def _pack_scales(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """8 six-bit scales and mins ``[n, 8]`` -> llama.cpp's 12 bytes ``[n, 12]``."""
    lo = (ls[:, :4] | ((ls[:, 4:] >> 4) << 6)).astype(np.uint8)
    mid = (lm[:, :4] | ((lm[:, 4:] >> 4) << 6)).astype(np.uint8)
    hi = ((ls[:, 4:] & 0x0F) | ((lm[:, 4:] & 0x0F) << 4)).astype(np.uint8)
    return np.concatenate([lo, mid, hi], axis=1)


def _nibbles_k(q: np.ndarray) -> np.ndarray:
    """``[n, 256]`` values 0..15 -> 128 bytes: byte ``32c + l`` holds element ``64c + l`` (low)
    and ``64c + 32 + l`` (high)."""
    g = q.reshape(len(q), 4, 2, 32)
    return (g[:, :, 0] | (g[:, :, 1] << 4)).reshape(len(q), 128).astype(np.uint8)


def _round_affine(
    sub: np.ndarray, d: np.ndarray, dmin: np.ndarray, ls: np.ndarray, lm: np.ndarray, nmax: int
) -> tuple[np.ndarray, np.ndarray]:
    """Codes ``[n, 8, 32]`` (uint8) of sub-blocks ``sub`` on the grid of 6-bit scales ``ls`` /
    mins ``lm`` ``[n, 8]`` of fp16 ``d`` / ``dmin`` ``[n]``, and the float32 values they decode
    to (``(d * ls) * q - (dmin * lm)`` in float32, as llama.cpp and gguf compute it)."""
    step = (d[:, None] * ls.astype(np.float32))[:, :, None]
    shift = (dmin[:, None] * lm.astype(np.float32))[:, :, None]
    safe = np.where(step > 0, step, 1.0)
    q = np.where(step > 0, np.clip(np.rint((sub + shift) / safe), 0, nmax), 0).astype(np.uint8)
    return q, step * q.astype(np.float32) - shift


def _refine_scales(
    sub: np.ndarray,
    w: np.ndarray,
    supers: tuple[np.ndarray, np.ndarray],
    levels: tuple[np.ndarray, np.ndarray],
    nmax: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Each sub-block's 6-bit scale and min moved by -1, 0 or +1 where that lowers its
    weighted error after the final rounding (a step beyond llama.cpp's, which rounds them to
    nearest once)."""
    (d, dmin), (ls, lm) = supers, levels
    best_ls, best_lm = ls.copy(), lm.copy()
    best = np.full(ls.shape, np.inf)
    for a in (0, -1, 1):
        for b in (0, -1, 1):
            ls2 = np.clip(ls.astype(np.int16) + a, 0, 63).astype(np.uint8)
            lm2 = np.clip(lm.astype(np.int16) + b, 0, 63).astype(np.uint8)
            _, values = _round_affine(sub, d, dmin, ls2, lm2, nmax)
            err = (w * (values - sub) ** 2).sum(axis=2)
            better = err < best
            best = np.where(better, err, best)
            best_ls = np.where(better, ls2, best_ls)
            best_lm = np.where(better, lm2, best_lm)
    return best_ls, best_lm


def _encode_affine_k(x: np.ndarray, qw: np.ndarray | None, bits: int) -> tuple[np.ndarray, ...]:
    """Q4_K (bits 4) / Q5_K (bits 5) super-blocks ``x`` ``[n, 256]`` -> block bytes, values."""
    nmax = 2**bits - 1
    n = len(x)
    w = _weights(x, qw, "abs", 2.0)
    sub, subw = x.reshape(n * 8, 32), w.reshape(n * 8, 32)
    scale, offset = fit_affine(sub, subw, nmax, (-0.9, 0.05, 36))
    sw = subw.sum(axis=1).reshape(n, 8)
    d = _f16(fit_positive(scale.reshape(n, 8), sw, 63))
    dmin = _f16(fit_positive(offset.reshape(n, 8), sw, 63))
    d32, m32 = d.astype(np.float32), dmin.astype(np.float32)
    inv = lambda v: np.where(v > 0, 1.0 / np.where(v > 0, v, 1.0), 0.0)  # noqa: E731
    ls = np.clip(np.rint(scale.reshape(n, 8) * inv(d32)[:, None]), 0, 63).astype(np.uint8)
    lm = np.clip(np.rint(offset.reshape(n, 8) * inv(m32)[:, None]), 0, 63).astype(np.uint8)
    ls, lm = _refine_scales(x.reshape(n, 8, 32), w.reshape(n, 8, 32), (d32, m32), (ls, lm), nmax)
    q, values = _round_affine(x.reshape(n, 8, 32), d32, m32, ls, lm, nmax)
    values, q = values.reshape(n, QK_K), q.reshape(n, QK_K)
    head = [d.reshape(n, 1).view(np.uint8), dmin.reshape(n, 1).view(np.uint8)]
    parts = [*head, _pack_scales(ls, lm)]
    if bits == 5:
        high = ((q.reshape(n, 8, 32) >> 4) & 1).astype(np.uint8)
        parts.append((high << np.arange(8, dtype=np.uint8)[None, :, None]).sum(axis=1))
    parts.append(_nibbles_k(q & 0x0F))
    return np.concatenate(parts, axis=1).astype(np.uint8), values


def _encode_q6_k(x: np.ndarray, qw: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Q6_K super-blocks ``x`` ``[n, 256]`` -> block bytes, values."""
    n = len(x)
    w = qw * np.ones_like(x) if qw is not None else _weights(x, None, "square", 1.0)
    scale = fit_symmetric(x.reshape(n * 16, 16), w.reshape(n * 16, 16), 32).reshape(n, 16)
    # the super-block scale: the sub-block scales as int8 (-128..127) times fp16 d
    sw = np.maximum(w.reshape(n, 16, 16).sum(axis=2), _EPS)
    d = _f16(fit_symmetric(scale, sw, 128))  # signed: the largest scale may take -128
    d32 = d.astype(np.float32)
    inv = np.where(d32 != 0, 1.0 / np.where(d32 != 0, d32, 1.0), 0.0)
    sc0 = np.clip(np.rint(scale * inv[:, None]), -128, 127)
    sub, subw = x.reshape(n, 16, 16), w.reshape(n, 16, 16)
    best = np.full(sc0.shape, np.inf)
    sc, k, values = sc0.astype(np.int8), np.zeros_like(sub), np.zeros(sub.shape, np.float32)
    for a in (0, -1, 1):  # each int8 scale moved by one where that lowers its weighted error
        cand = np.clip(sc0 + a, -128, 127).astype(np.int8)
        step = (d32[:, None] * cand.astype(np.float32))[:, :, None]
        safe = np.where(step != 0, step, 1.0)
        kc = np.where(step != 0, np.clip(np.rint(sub / safe), -32, 31), 0)
        vc = step * kc.astype(np.float32)
        err = (subw * (vc - sub) ** 2).sum(axis=2)
        better = err < best
        best = np.where(better, err, best)
        sc = np.where(better, cand, sc)
        k = np.where(better[:, :, None], kc, k)
        values = np.where(better[:, :, None], vc, values)
    q = (k + 32).astype(np.uint8).reshape(n, 2, 4, 32)  # [half, quarter, l]
    ql = (q[:, :, :2] & 0x0F) | ((q[:, :, 2:] & 0x0F) << 4)  # [half, 2, 32] -> 64 bytes/half
    qh = ((q >> 4) << (2 * np.arange(4, dtype=np.uint8))[None, None, :, None]).sum(axis=2)
    parts = [ql.reshape(n, 128), qh.astype(np.uint8).reshape(n, 64)]
    parts += [sc.view(np.uint8), d.reshape(n, 1).view(np.uint8)]
    return np.concatenate(parts, axis=1).astype(np.uint8), values.reshape(n, QK_K)


def _encode_small(x: np.ndarray, qw: np.ndarray | None, ggml_type: str) -> tuple[np.ndarray, ...]:
    """Q5_0 / Q8_0 blocks of 32 ``x`` ``[n, 32]``: symmetric, ``d`` fp16, importance-weighted
    scale search for Q5_0 when ``qw`` is given (llama.cpp's Q8_0 is plain max-abs rounding)."""
    nmax = 16 if ggml_type == "Q5_0" else 127
    if ggml_type == "Q8_0" or qw is None:
        big = np.take_along_axis(x, np.abs(x).argmax(axis=1)[:, None], axis=1)[:, 0]
        scale = np.abs(big) / 127 if ggml_type == "Q8_0" else big / -16
    else:
        scale = fit_symmetric(x, qw * np.sqrt((x * x).mean(axis=1, keepdims=True) + x * x), nmax)
    d = _f16(scale)
    d32 = d.astype(np.float32)[:, None]
    lo, hi = (-16, 15) if ggml_type == "Q5_0" else (-127, 127)
    k = np.where(d32 != 0, np.clip(np.rint(x / np.where(d32 != 0, d32, 1.0)), lo, hi), 0)
    values = d32 * k.astype(np.float32)
    head = d.reshape(-1, 1).view(np.uint8)
    if ggml_type == "Q8_0":
        return np.concatenate([head, k.astype(np.int8).view(np.uint8)], axis=1), values
    q = (k + 16).astype(np.uint8)
    high = np.packbits((q >> 4).astype(np.uint8), axis=1, bitorder="little")
    low = (q[:, :16] & 0x0F) | ((q[:, 16:] & 0x0F) << 4)
    return np.concatenate([head, high, low.astype(np.uint8)], axis=1), values


_ENCODERS: dict[str, Callable[[np.ndarray, np.ndarray | None], tuple[np.ndarray, ...]]] = {
    "Q4_K": lambda x, qw: _encode_affine_k(x, qw, 4),
    "Q5_K": lambda x, qw: _encode_affine_k(x, qw, 5),
    "Q6_K": _encode_q6_k,
    "Q5_0": lambda x, qw: _encode_small(x, qw, "Q5_0"),
    "Q8_0": lambda x, qw: _encode_small(x, qw, "Q8_0"),
}
ENCODED_TYPES = tuple(_ENCODERS)


def encode(weight: np.ndarray, ggml_type: str, importance: np.ndarray | None = None) -> Encoded:
    """``weight`` ``[rows, cols]`` as ``ggml_type`` blocks; ``importance`` ``[cols]`` (the mean
    squared activation of each input, llama.cpp's imatrix) weights the rounding error.
    ``cols`` must be a multiple of the type's block (256 for k-quants, 32 otherwise)."""
    if ggml_type not in _ENCODERS:
        raise ValueError(f"cannot encode {ggml_type}; encoded here: {', '.join(ENCODED_TYPES)}")
    rows, cols = weight.shape
    block = BLOCK_SIZE[ggml_type]
    if cols % block:
        raise ValueError(f"{cols} columns are not a multiple of {ggml_type}'s block of {block}")
    x = np.ascontiguousarray(weight, dtype=np.float32).reshape(-1, block)
    qw = None
    if importance is not None:
        imp = np.asarray(importance, dtype=np.float32).reshape(-1)
        if imp.shape[0] != cols:
            raise ValueError(f"importance has {imp.shape[0]} entries for {cols} columns")
        qw = np.tile(np.maximum(imp, 0).reshape(-1, block), (rows, 1))
    per = max(1, _CHUNK * QK_K // block)
    data, values = [], []
    for start in range(0, len(x), per):
        part_qw = None if qw is None else qw[start : start + per]
        d, v = _ENCODERS[ggml_type](x[start : start + per].astype(np.float64), part_qw)
        data.append(d)
        values.append(np.asarray(v, dtype=np.float32))
    raw = np.concatenate(data).reshape(rows, -1)
    return Encoded(ggml_type, raw, np.concatenate(values).reshape(rows, cols))
