"""GPTQ (Frantar et al., 2022): quantize a weight column by column, pushing each column's error
onto the columns not yet quantized through the inverse Hessian of the layer's inputs.

    gptq_quantize(w [out, in], H [in, in], spec) -> GPTQResult      (pure maths, no hooks)

``H = 2/n * sum x x^T`` comes from ``slimtorch.calibrate.statistics.HessianAccumulator``. The
algorithm: dead inputs (``H_jj == 0``) get weight 0; optionally columns are visited by decreasing
``H_jj`` (``act_order``); ``U`` = upper Cholesky factor of the damped inverse Hessian; columns are
processed in blocks of ``block_size`` with the error of each block applied lazily to the rest.

The grid (:class:`ColumnGrid`) is the one ``quantize.rtn`` uses (same observer, same fp16 scale
rounding), fitted per group when the loop reaches the group's first column, or up front on the
original weight with ``static_groups``. With the ``mse`` observer the range search weighs each
column's error by ``H_jj`` (the column's mean squared input, as llama.cpp's importance matrix
does), since that is what the layer's output sees. With ``H = I`` the result equals
round-to-nearest exactly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from slimtorch.calibrate.statistics import (
    check_second_order,
    dead_inputs,
    inverse_cholesky,
    window,
)
from slimtorch.core.errors import ConfigError, UserInputError
from slimtorch.formats.state import QuantState, from_matrix
from slimtorch.quantize.observers import observe
from slimtorch.quantize.primitives import (
    QuantSpec,
    ScaleDtype,
    affine_codes,
    affine_scale,
    affine_zero_point,
    code_dtype,
    round_scale_fp16,
    to_blocks,
)


@dataclass
class GPTQResult:
    """A quantized ``[out, in]`` weight. ``g_idx[j]`` is the group of input column ``j``."""

    codes: torch.Tensor  # [out, in] integer codes, original column order
    scale: torch.Tensor  # [rows, groups] float32 (rows = 1 per tensor, else out)
    zero_point: torch.Tensor  # [rows, groups] int32
    g_idx: torch.Tensor  # [in] int64
    perm: torch.Tensor | None  # [in] int64: the order columns were processed in (act_order)
    weight: torch.Tensor  # [out, in] float32, the dequantized weight
    loss: float  # sum over columns of (w - q)^2 / (2 * U_jj^2)
    spec: QuantSpec
    scale_dtype: ScaleDtype

    def contiguous_groups(self) -> bool:
        """Whether every group is a run of consecutive columns (what ``QuantState`` stores)."""
        gs = self.codes.shape[1] if self.spec.granularity != "per_group" else self.group_size
        expected = torch.arange(self.g_idx.numel(), device=self.g_idx.device) // gs
        return bool(torch.equal(self.g_idx, expected))

    @property
    def group_size(self) -> int:
        in_features = self.codes.shape[1]
        if self.spec.granularity != "per_group":
            return in_features
        assert self.spec.group_size is not None
        return min(self.spec.group_size, in_features)

    def quant_state(self, shape: Sequence[int] | None = None) -> QuantState:
        """The ``QuantState`` (codes reshaped to the weight ``shape``, default ``[out, in]``)."""
        if not self.contiguous_groups():
            raise ConfigError(
                "act_order with per-group quantization and static_groups=False puts columns far"
                " apart in one group, which the artifact cannot store; set static_groups: true"
            )
        codes = self.codes if shape is None else from_matrix(self.codes, shape)
        per_group = self.spec.granularity == "per_group"
        return QuantState(
            scheme="affine",
            bits=self.spec.bits,
            signed=self.spec.signed,
            granularity=self.spec.granularity,
            codes=codes,
            scale=self.scale.clone(),
            zero_point=self.zero_point.clone(),
            group_size=self.group_size if per_group else None,
            scale_dtype=self.scale_dtype,
        )


class ColumnGrid:
    """The affine grid of one ``[out, in]`` weight, filled in as a column loop reaches columns.

    Loop step ``k`` handles original column ``order[k]``. Dynamic groups are runs of
    ``width`` consecutive loop steps, fitted by :meth:`fit` from the current (error-updated)
    values; static groups are runs of consecutive original columns fitted by :meth:`fit_static`.
    Also usable by SparseGPT to quantize while pruning (``prune.sparsegpt.ColumnQuantizer``).
    """

    def __init__(
        self,
        spec: QuantSpec,
        out_features: int,
        in_features: int,
        order: torch.Tensor | None = None,
        static: bool = False,
        device: torch.device | str | None = None,
        importance: torch.Tensor | None = None,
    ) -> None:
        """``importance`` ``[in]`` (original column order): weights of the ``mse`` range search."""
        self.spec = spec
        self.importance = importance
        gs = spec.group_size if spec.granularity == "per_group" and spec.group_size else in_features
        self.width = min(gs, in_features)
        groups = math.ceil(in_features / self.width)
        rows = 1 if spec.granularity == "per_tensor" else out_features
        self.order = order
        steps = torch.arange(in_features, device=device) // self.width
        self.g_idx = steps.clone()
        if order is not None and not static:
            self.g_idx[order] = steps
        loop_group = self.g_idx if order is None else self.g_idx[order]
        self.loop_group: list[int] = loop_group.tolist()
        self.static = static
        self.scale = torch.ones(rows, groups, device=device)
        self.zero_point = torch.zeros(rows, groups, dtype=torch.int32, device=device)
        self.codes = torch.zeros(out_features, in_features, device=device)  # loop order
        self._fp16 = True

    def _set(self, lo: torch.Tensor, hi: torch.Tensor, groups: slice) -> None:
        scale, dtype = round_scale_fp16(affine_scale(lo, hi, self.spec))
        self._fp16 &= dtype == "float16"
        self.scale[:, groups] = scale
        self.zero_point[:, groups] = affine_zero_point(lo, scale, self.spec)

    def fit_static(self, w: torch.Tensor) -> None:
        """Fit every group up front on ``w`` ``[out, in]`` (original column order)."""
        weights = None
        if self.importance is not None and self.spec.granularity != "per_tensor":
            weights = to_blocks(self.importance.unsqueeze(0).to(w.dtype), self.spec)
        elif self.importance is not None:
            weights = to_blocks(self.importance.to(w.dtype).expand_as(w), self.spec)
        lo, hi = observe(to_blocks(w, self.spec), self.spec, weights)
        self._set(lo, hi, slice(None))

    def needs_fit(self, k: int) -> bool:
        return not self.static and k % self.width == 0

    def fit(self, k: int, window: torch.Tensor) -> None:
        """Fit the group starting at loop step ``k`` on ``window``: its columns' current values."""
        per_tensor = self.scale.shape[0] == 1
        blocks = window.reshape(1, 1, -1) if per_tensor else window.unsqueeze(1)
        weights = None
        if self.importance is not None:
            steps = torch.arange(k, k + window.shape[1], device=window.device)
            cols = steps if self.order is None else self.order[steps]
            imp = self.importance[cols].to(window.dtype)
            weights = imp.expand_as(window).reshape(1, 1, -1) if per_tensor else imp.view(1, 1, -1)
        lo, hi = observe(blocks, self.spec, weights)
        g = self.loop_group[k]
        self._set(lo, hi, slice(g, g + 1))

    def quantize(self, k: int, col: torch.Tensor) -> torch.Tensor:
        """Quantize-dequantize column ``col`` ``[out]`` of loop step ``k``; records its codes."""
        g = self.loop_group[k]
        s, z = self.scale[:, g], self.zero_point[:, g].to(col.dtype)
        codes = affine_codes(col, s, z, self.spec)
        self.codes[:, k] = codes
        return (codes - z) * s

    def result(self, weight: torch.Tensor, loss: float = 0.0) -> GPTQResult:
        """Codes and grid in original column order, with the dequantized ``weight``."""
        codes = self.codes
        if self.order is not None:
            codes = codes[:, torch.argsort(self.order)]
        return GPTQResult(
            codes=codes.to(code_dtype(self.spec.bits, self.spec.signed)),
            scale=self.scale,
            zero_point=self.zero_point,
            g_idx=self.g_idx,
            perm=self.order,
            weight=weight,
            loss=loss,
            spec=self.spec,
            scale_dtype="float16" if self._fp16 else "float32",
        )


def check_inputs(
    weight: torch.Tensor, hessian: torch.Tensor, block_size: int, mask: torch.Tensor | None
) -> None:
    check_second_order(weight, hessian, block_size)
    if mask is not None and mask.shape != weight.shape:
        raise UserInputError(f"mask shape {tuple(mask.shape)} != weight {tuple(weight.shape)}")


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    spec: QuantSpec,
    *,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
    static_groups: bool = False,
    mask: torch.Tensor | None = None,
) -> GPTQResult:
    """GPTQ of ``weight`` ``[out, in]``; ``mask`` (True = kept) keeps pruned weights at 0."""
    check_inputs(weight, hessian, block_size, mask)
    w = weight.detach().to(torch.float32).clone()
    h = hessian.detach().clone()
    h = h if h.dtype in (torch.float32, torch.float64) else h.to(torch.float32)
    dead = torch.nonzero(dead_inputs(h)).flatten()
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    keep = None if mask is None else mask.to(torch.bool)
    if keep is not None:
        w = w * keep
    order = torch.argsort(torch.diagonal(h), descending=True, stable=True) if act_order else None
    importance = torch.diagonal(h).to(torch.float32) if spec.observer == "mse" else None
    grid = ColumnGrid(spec, w.shape[0], w.shape[1], order, static_groups, w.device, importance)
    if static_groups:
        grid.fit_static(w)
    if order is not None:
        w, h = w[:, order], h[order][:, order]
        keep = None if keep is None else keep[:, order]
    q, loss = _column_loop(w, inverse_cholesky(h, damp), grid, block_size, keep)
    if order is not None:
        q = q[:, torch.argsort(order)]
    return grid.result(q, loss)


def _column_loop(
    w: torch.Tensor, u: torch.Tensor, grid: ColumnGrid, block: int, keep: torch.Tensor | None
) -> tuple[torch.Tensor, float]:
    """The lazy-batch GPTQ loop over ``w`` (modified in place); returns ``(Q, loss)``."""
    cols = w.shape[1]
    q = torch.zeros_like(w)
    loss = torch.zeros((), dtype=torch.float64, device=w.device)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        w1, u1 = w[:, i1:i2].clone(), u[i1:i2, i1:i2]
        err = torch.zeros_like(w1)
        for j in range(i2 - i1):
            k = i1 + j
            if grid.needs_fit(k):
                grid.fit(k, window(w, w1, i1, j, grid.width))
            col = w1[:, j]
            qc = grid.quantize(k, col)
            q[:, k] = qc
            e = (col - qc) / u1[j, j]
            loss += e.pow(2).sum().double() / 2
            update = e.unsqueeze(1) * u1[j, j:].unsqueeze(0)
            w1[:, j:] -= update if keep is None else update * keep[:, k:i2]
            err[:, j] = e
        tail = err @ u[i1:i2, i2:]
        w[:, i2:] -= tail if keep is None else tail * keep[:, i2:]
    return q, float(loss)
