"""Which ONNX initializer holds which compressed weight, and that weight's codes as arrays.

A :class:`Source` is one parameter with a quantization state (or an ``Int8DynamicLinear``'s
weight), in the matrix view ``[out, K]``: codes adjusted so that decoding them gives exactly the
parameter's effective float values (pruned entries get the zero code). :func:`match` maps a
float initializer of the exported graph to its source(s): by parameter name, else by value
(same layout, transposed, or row by row - the exporter reorders and concatenates LSTM/GRU gate
rows); anything else stays dense float.
"""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from slimtorch.formats.state import QuantState, fractional_zero, iter_states, to_matrix


@dataclass
class Source:
    """A compressed weight, matrix view ``[out, K]``; ``scale``/``zero_point`` ``[out, G]``."""

    param: str
    weight: np.ndarray  # effective float32 values, parameter shape
    codes: np.ndarray  # int32 [out, K]: affine codes, signed +-1/0 for binary/ternary, or indices
    scale: np.ndarray  # float32 [out, G] (empty for codebooks)
    zero_point: np.ndarray  # int32 [out, G]
    bits: int
    signed: bool
    granularity: str
    group: int | None = None
    codebook: np.ndarray | None = None
    dynamic: bool = False  # an Int8DynamicLinear: int8 activations too
    act_qmax: int = 127  # its activation codes: 0..act_qmax (asymmetric) or +-127 (symmetric)
    act_symmetric: bool = False

    @property
    def matrix(self) -> np.ndarray:
        return to_matrix(torch.from_numpy(self.weight)).numpy()

    def decode_matrix(self) -> np.ndarray:
        if self.codebook is not None:
            return self.codebook[self.codes]
        rep = self.group or 1
        k = self.codes.shape[1]
        scale = np.repeat(self.scale, rep, axis=1)[:, :k] if self.group else self.scale
        zp = np.repeat(self.zero_point, rep, axis=1)[:, :k] if self.group else self.zero_point
        return (self.codes - zp).astype(np.float32) * scale.astype(np.float32)


def _codebook_codes(q: QuantState, keep: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    assert q.codebook is not None
    book = q.codebook.detach().to(torch.float32).numpy().copy()
    codes = to_matrix(q.codes.to(torch.int64)).numpy().astype(np.int32)
    if keep is not None and not keep.all():
        zeros = np.flatnonzero(book == 0)
        if zeros.size == 0 and book.size >= 256 and keep.any():  # only the entries in use
            used, inverse = np.unique(np.where(keep, codes, codes[keep][0]), return_inverse=True)
            book, codes = book[used], inverse.reshape(keep.shape).astype(np.int32)
        if zeros.size == 0:  # a code for the pruned entries (codes are stored as 8 bits anyway)
            book = np.append(book, np.float32(0))
            zeros = np.array([book.size - 1])
        codes = np.where(keep, codes, int(zeros[0])).astype(np.int32)
    return codes, book


def source_of(param: str, q: QuantState, mask: torch.Tensor | None, w: torch.Tensor) -> Source:
    """The matrix-view arrays of ``q`` (a weight whose effective values are ``w``)."""
    keep = None if mask is None else to_matrix(mask.to(torch.bool)).numpy()
    weight = w.detach().to(torch.float32).cpu().numpy().copy()
    if q.scheme == "codebook":
        codes, book = _codebook_codes(q, keep)
        empty = np.zeros((codes.shape[0], 0), np.float32)
        return Source(
            param=param, weight=weight, granularity=q.granularity, codes=codes, scale=empty, zero_point=empty.astype(np.int32),
            bits=max(q.bits, int(np.ceil(np.log2(max(book.size, 2))))), signed=False,
            codebook=book,
        )  # fmt: skip
    codes = to_matrix(q.codes.to(torch.int32)).numpy().astype(np.int32)
    out = codes.shape[0]
    scale = (
        q.scale.detach().to(torch.float32).numpy().reshape(out if q.scale.numel() > 1 else 1, -1)
    )
    zp = q.zero_point.to(torch.int32).numpy().reshape(scale.shape).astype(np.int32)
    scale, zp = (
        np.broadcast_to(scale, (out, scale.shape[1])),
        np.broadcast_to(zp, (out, zp.shape[1])),
    )
    bits, signed = q.bits, q.signed
    if q.scheme in ("binary", "ternary"):
        codes = codes * 2 - 1 if q.scheme == "binary" else codes - 1
        zp, bits, signed = np.zeros_like(zp), 2, True
    group = q.group_size if q.granularity == "per_group" else None
    if keep is not None:
        zp_full = np.repeat(zp, group, axis=1)[:, : codes.shape[1]] if group else zp
        codes = np.where(keep, codes, np.broadcast_to(zp_full, codes.shape)).astype(np.int32)
    return Source(
        param=param, weight=weight, granularity=q.granularity, codes=codes, scale=np.ascontiguousarray(scale),
        zero_point=np.ascontiguousarray(zp), bits=bits, signed=signed, group=group,
    )  # fmt: skip


def collect_sources(model: nn.Module) -> tuple[list[Source], list[dict[str, str]]]:
    """Every weight of ``model`` that can be stored low-bit, and why the others cannot."""
    sources, skipped = [], []
    for mname, module, pname, state in iter_states(model):
        param = f"{mname}.{pname}" if mname else pname
        q = state.quant
        if q is None:
            reason = "unstructured sparsity only: stored as dense float (ONNX keeps no masks)"
            skipped.append({"param": param, "reason": reason})
            continue
        if q.scheme == "affine" and q.bits > 8:
            skipped.append({"param": param, "reason": f"{q.bits}-bit codes do not fit int8"})
            continue
        if fractional_zero(q):
            reason = "fractional zero points (HQQ): ONNX's integer zero points cannot hold them"
            skipped.append({"param": param, "reason": reason})
            continue
        src = source_of(param, q, state.mask, getattr(module, pname))
        if not np.array_equal(src.decode_matrix(), src.matrix):
            reason = "its quantization state does not reproduce the weight's values"
            skipped.append({"param": param, "reason": reason})
            continue
        sources.append(src)
    return sources, skipped


def float_twin(model: nn.Module) -> tuple[nn.Module, list[Source]]:
    """A copy of ``model`` with every ``Int8DynamicLinear`` as an ``nn.Linear`` holding its
    dequantized weight (exportable), and those weights as dynamic-int8 sources."""
    from slimtorch.graph.weights import replace_module
    from slimtorch.runtime.int8 import Int8DynamicLinear, onednn_available

    names = [n for n, m in model.named_modules() if isinstance(m, Int8DynamicLinear) and n]
    if not names:
        return model, []
    twin = copy.deepcopy(model)
    sources = []
    for name in names:
        mod = twin.get_submodule(name)
        assert isinstance(mod, Int8DynamicLinear)
        lin = nn.Linear(mod.in_features, mod.out_features, mod.bias is not None)
        with torch.no_grad():
            lin.weight.copy_(mod.dequantized_weight())
            if mod.bias is not None and lin.bias is not None:
                lin.bias.copy_(mod.bias)
        replace_module(twin, name, lin.eval())
        scale = mod.weight_scale.detach().to(torch.float32).numpy().reshape(-1, 1)
        kernel = mod.kernel if mod.kernel != "auto" else None
        kernel = kernel or ("onednn" if onednn_available() else "int_mm")  # as on CPU
        sources.append(
            Source(
                param=f"{name}.weight", weight=lin.weight.detach().numpy().copy(),
                codes=mod.weight_int8.to(torch.int32).numpy(), scale=scale,
                zero_point=np.zeros_like(scale, dtype=np.int32), bits=8, signed=True,
                granularity="per_channel", dynamic=True, act_qmax=mod._act_qmax_u8,
                act_symmetric=kernel == "int_mm",
            )
        )  # fmt: skip
    return twin, sources


def _key(a: np.ndarray) -> tuple[tuple[int, ...], bytes]:
    return a.shape, hashlib.blake2b(np.ascontiguousarray(a).tobytes(), digest_size=16).digest()


@dataclass
class Match:
    """``layout`` "same" | "transposed" | "rows"; ``rows`` lists (source, row) per initializer row."""

    layout: str
    source: Source
    rows: list[tuple[Source, int]] | None = None
    io: tuple[str, str, bool] | None = None  # dynamic int8: (activation, output, bias added)


class Matcher:
    """Finds the source of an initializer: by name, by value, or row by row."""

    def __init__(self, sources: list[Source]) -> None:
        self.by_name = {s.param: s for s in sources}
        self.by_value: dict[tuple[tuple[int, ...], bytes], tuple[str, Source]] = {}
        for s in sources:
            self.by_value.setdefault(_key(s.weight), ("same", s))
            if s.weight.ndim == 2:
                self.by_value.setdefault(_key(s.weight.T), ("transposed", s))
        self.sources = sources
        self._rows: dict[tuple[tuple[int, ...], bytes], list[tuple[Source, int]]] | None = None

    def _row_table(self) -> dict[tuple[tuple[int, ...], bytes], list[tuple[Source, int]]]:
        if self._rows is None:
            self._rows = {}
            for s in self.sources:
                if s.weight.ndim == 2:
                    for i, row in enumerate(s.weight):
                        self._rows.setdefault(_key(row), []).append((s, i))
        return self._rows

    def match(self, name: str, value: np.ndarray) -> Match | None:
        src = self.by_name.get(name.removeprefix("model."))
        if src is not None and np.array_equal(src.weight, value):
            return Match("same", src)
        if src is not None and value.ndim == 2 and np.array_equal(src.weight.T, value):
            return Match("transposed", src)
        found = self.by_value.get(_key(value))
        if found is not None:
            return Match(found[0], found[1])
        if value.ndim < 2 or value.shape[-1] < 2:
            return None
        table = self._row_table()
        cands = [table.get(_key(row)) for row in value.reshape(-1, value.shape[-1])]
        if not all(cands):
            return None
        votes: dict[str, int] = {}
        for c in cands:
            for s in {s.param for s, _ in c or []}:
                votes[s] = votes.get(s, 0) + 1
        rows = [max(c or [], key=lambda si: votes[si[0].param]) for c in cands]
        return Match("rows", rows[0][0], rows)


def unmatched_reason(source: Source, initializers: dict[str, np.ndarray]) -> str:
    """Why no initializer holds ``source``'s values: one of its shape is the weight scaled per
    output channel (BatchNorm folded into it), or has other values, or none has its shape."""
    w = source.weight.reshape(source.weight.shape[0], -1).astype(np.float64)
    same = [(n, v) for n, v in initializers.items() if v.shape == source.weight.shape]
    for name, value in same:
        v = value.reshape(w.shape).astype(np.float64)
        scale = (v * w).sum(1) / np.maximum((w * w).sum(1), 1e-30)
        if np.all(np.abs(v - scale[:, None] * w) <= 1e-5 * np.abs(v) + 1e-7):
            return (
                f"the exporter folded a per-channel scale into it (BatchNorm folding: initializer"
                f" {name}), so its values no longer decode from the codes"
            )
    if same:
        return f"the exporter changed its values (initializer {same[0][0]} has its shape)"
    return "no initializer of the exported graph holds its values (the exporter transformed it)"
