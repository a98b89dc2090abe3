"""Streaming statistics of a layer's inputs, fed one batch at a time by the calibration pipeline.

Every accumulator takes inputs shaped ``[..., in_features]`` (any rank: ``[tokens, in]``,
``[batch, seq, in]``, ...); each row of the last axis is one sample (one token). Each batch's
contribution is computed in the accumulator's ``dtype`` and the running sums are kept in its
``sum_dtype`` (default float64; read back in ``dtype``), so the order in which batches are
summed, in one process or across the ranks of a distributed run (:meth:`reduce`), changes the
result at most in the float64 rounding (docs/distributed.md states the bound; usually not at
all). ``sum_dtype="float32"`` (``calibration.sum_dtype``, :func:`use_sum_dtype`) halves the
memory of the sums and what a distributed run sends, and gives up that exactness: the result
then depends on the summation order in the float32 rounding (docs/distributed.md).

    HessianAccumulator    H = 2/n * sum x x^T              GPTQ, SparseGPT
    InputNormAccumulator  sum_t x_tj^2 per input channel     Wanda, OWL
    AbsMaxAccumulator     max_t |x_tj| per input channel     SmoothQuant
    AbsMeanAccumulator    mean_t |x_tj| per input channel    AWQ
    FirstRowsAccumulator  the first ``limit`` rows            AWQ / SmoothQuant searches

The Hessian helpers below (:func:`check_hessian`, :func:`dead_inputs`, :func:`inverse_cholesky`)
are shared by the second-order methods (GPTQ in ``quantize``, SparseGPT in ``prune``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, Protocol

import torch
from torch import nn

from slimtorch.core.errors import ConfigError, UnsupportedModelError, UserInputError
from slimtorch.runtime.moe import ExpertMLP

AccumDtype = Literal["float32", "float64"]
_DTYPES = {"float32": torch.float32, "float64": torch.float64}


class Reducer(Protocol):
    """Combines the partial statistics of every process of a distributed run (every process
    calls the same methods in the same order; see ``slimtorch.calibrate.distributed``)."""

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """Elementwise sum over the processes."""

    def maximum(self, t: torch.Tensor) -> torch.Tensor:
        """Elementwise maximum over the processes."""

    def total(self, n: int) -> int:
        """Sum of an integer over the processes."""

    def first_rows(self, rows: torch.Tensor, limit: int) -> torch.Tensor:
        """The rows of every process concatenated in rank order, the first ``limit`` kept."""


def _add(total: torch.Tensor | None, part: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``total += part`` in ``dtype``; the in-place add casts ``part`` on the fly (the same bits
    as converting it first, without a float64 copy of an ``[in, in]`` Hessian per batch).
    ``part`` is a fresh temporary, so starting the total with it (same dtype) copies nothing."""
    return part.to(dtype) if total is None else total.add_(part)


def _reduce_sum(
    total: torch.Tensor | None, shape: tuple[int, ...], comm: Reducer, dtype: torch.dtype
) -> torch.Tensor:
    return comm.sum(torch.zeros(shape, dtype=dtype) if total is None else total)


def _dtype(what: str, name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise UserInputError(f"{what}={name!r}; use 'float32' or 'float64'")
    return _DTYPES[name]


def use_sum_dtype(stats: dict[str, Any], sum_dtype: AccumDtype) -> dict[str, Any]:
    """``stats`` with the running sums of its accumulators kept in ``sum_dtype`` (a stage's
    ``calibration.sum_dtype``; set before the first batch). Maxima and kept rows ignore it."""
    dtype = _dtype("calibration.sum_dtype", sum_dtype)
    for acc in stats.values():
        if isinstance(acc, _ChannelAccumulator):
            acc.sum_dtype = dtype
    return stats


class _ChannelAccumulator:
    """Shared plumbing: shape/finite checks, the row count, the accumulation dtype and the
    dtype of the running sums (``sum_dtype``)."""

    def __init__(
        self, in_features: int, dtype: AccumDtype = "float32", sum_dtype: AccumDtype = "float64"
    ) -> None:
        if in_features < 1:
            raise UserInputError(f"in_features must be >= 1, got {in_features}")
        self.in_features = in_features
        self.dtype = _dtype("dtype", dtype)
        self.sum_dtype = _dtype("sum_dtype", sum_dtype)
        self.count = 0  # rows (tokens) seen
        # no row seen: give neutral statistics instead of refusing (an expert no calibration
        # token was routed to: its method then runs in its data-free form; see starved_experts)
        self.data_free = False

    def _neutral(self) -> torch.Tensor | None:
        """All-ones per-channel statistics when ``data_free`` and no row was seen."""
        if self.data_free and self.count == 0:
            return torch.ones(self.in_features, dtype=self.dtype)
        return None

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` as ``[rows, in_features]`` in the accumulation dtype, after validation."""
        if x.dim() < 1 or x.shape[-1] != self.in_features:
            raise UserInputError(
                f"{type(self).__name__} expects inputs [..., {self.in_features}], got"
                f" {tuple(x.shape)}; feed the inputs of the layer this accumulator was made for"
            )
        rows = x.detach().reshape(-1, self.in_features).to(self.dtype)
        self.count += rows.shape[0]
        return rows

    def _require_data(self, total: torch.Tensor | None) -> torch.Tensor:
        """The accumulated ``total``, refused when empty or not finite. NaN/Inf inputs carry
        into every total, so one check when it is read replaces one per batch."""
        if self.count == 0 or total is None:
            raise UserInputError(
                f"{type(self).__name__} has seen no inputs; pass calibration data that reaches"
                " this layer (check --data and the number of calibration samples)"
            )
        if not bool(torch.isfinite(total).all()):
            raise UnsupportedModelError(
                f"{type(self).__name__}: calibration inputs contain NaN or Inf; check the model"
                " weights and the calibration data (run the model in float32)"
            )
        return total


class HessianAccumulator(_ChannelAccumulator):
    """``H = 2/n * sum_t x_t x_t^T`` over every row ``x_t`` seen (``n`` rows in all)."""

    def __init__(
        self, in_features: int, dtype: AccumDtype = "float32", sum_dtype: AccumDtype = "float64"
    ) -> None:
        super().__init__(in_features, dtype, sum_dtype)
        self._sum: torch.Tensor | None = None

    def update(self, x: torch.Tensor) -> None:
        rows = self._rows(x)
        self._sum = _add(self._sum, rows.T @ rows, self.sum_dtype)

    def reduce(self, comm: Reducer) -> None:
        """Sum the partial statistics of every process (every process ends with the total)."""
        n = self.in_features
        self._sum = _reduce_sum(self._sum, (n, n), comm, self.sum_dtype)
        self.count = comm.total(self.count)

    def hessian(self) -> torch.Tensor:
        """The ``[in, in]`` Hessian in the accumulation dtype (the identity when ``data_free``
        and no row was seen: GPTQ is then round-to-nearest, SparseGPT magnitude pruning)."""
        if (ones := self._neutral()) is not None:
            return torch.diag(ones)
        return (self._require_data(self._sum) * (2.0 / self.count)).to(self.dtype)


class InputNormAccumulator(_ChannelAccumulator):
    """Per-input-channel sum of squares ``sum_t x_tj^2`` (Wanda's ``||X_j||^2``)."""

    def __init__(
        self, in_features: int, dtype: AccumDtype = "float32", sum_dtype: AccumDtype = "float64"
    ) -> None:
        super().__init__(in_features, dtype, sum_dtype)
        self._sq: torch.Tensor | None = None

    def update(self, x: torch.Tensor) -> None:
        self._sq = _add(self._sq, self._rows(x).pow(2).sum(dim=0), self.sum_dtype)

    def reduce(self, comm: Reducer) -> None:
        self._sq = _reduce_sum(self._sq, (self.in_features,), comm, self.sum_dtype)
        self.count = comm.total(self.count)

    def sq_norm(self) -> torch.Tensor:
        """``[in]``: ``||X_j||_2^2`` over all rows seen (ones when ``data_free`` and none)."""
        if (ones := self._neutral()) is not None:
            return ones
        return self._require_data(self._sq).to(self.dtype, copy=True)

    def mean_sq(self) -> torch.Tensor:
        """``[in]``: mean of ``x_j^2`` per row (the norm divided by the number of rows)."""
        return self.sq_norm() / max(self.count, 1)


class AbsMaxAccumulator(_ChannelAccumulator):
    """Per-input-channel ``max_t |x_tj|`` (SmoothQuant's activation ranges)."""

    def __init__(
        self, in_features: int, dtype: AccumDtype = "float32", sum_dtype: AccumDtype = "float64"
    ) -> None:
        super().__init__(in_features, dtype, sum_dtype)
        self._max: torch.Tensor | None = None

    def update(self, x: torch.Tensor) -> None:
        rows = self._rows(x)
        if rows.shape[0] == 0:
            return
        amax = rows.abs().amax(dim=0)
        self._max = amax if self._max is None else torch.maximum(self._max, amax)

    def reduce(self, comm: Reducer) -> None:
        zero = torch.zeros(self.in_features, dtype=self.dtype)  # |x| >= 0: a neutral maximum
        found = comm.maximum(zero if self._max is None else self._max)
        self.count = comm.total(self.count)
        self._max = found if self.count else None

    def absmax(self) -> torch.Tensor:
        return self._require_data(self._max).clone()


class AbsMeanAccumulator(_ChannelAccumulator):
    """Per-input-channel ``mean_t |x_tj|`` (AWQ's activation salience)."""

    def __init__(
        self, in_features: int, dtype: AccumDtype = "float32", sum_dtype: AccumDtype = "float64"
    ) -> None:
        super().__init__(in_features, dtype, sum_dtype)
        self._sum: torch.Tensor | None = None

    def update(self, x: torch.Tensor) -> None:
        self._sum = _add(self._sum, self._rows(x).abs().sum(dim=0), self.sum_dtype)

    def reduce(self, comm: Reducer) -> None:
        self._sum = _reduce_sum(self._sum, (self.in_features,), comm, self.sum_dtype)
        self.count = comm.total(self.count)

    def absmean(self) -> torch.Tensor:
        return (self._require_data(self._sum) / self.count).to(self.dtype)


class FirstRowsAccumulator:
    """Keeps the first ``limit`` rows of a layer's inputs (flattened to ``[rows, in]``, float32):
    the searches of AWQ and SmoothQuant run on them."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.rows: list[torch.Tensor] = []
        self.count = 0

    def update(self, x: torch.Tensor) -> None:
        flat = x.reshape(-1, x.shape[-1]).float()
        take = min(self.limit - self.count, flat.shape[0])
        if take > 0:
            self.rows.append(flat[:take].clone())
            self.count += take

    def reduce(self, comm: Reducer) -> None:
        """The first ``limit`` rows over the processes in rank order: with the calibration
        batches split into contiguous shards in rank order, the rows one process keeps."""
        mine = torch.cat(self.rows) if self.rows else torch.zeros(0, 0)
        rows = comm.first_rows(mine, self.limit)
        self.rows = [rows] if rows.shape[0] else []
        self.count = int(rows.shape[0])

    def matrix(self) -> torch.Tensor:
        return torch.cat(self.rows)


def check_hessian(hessian: torch.Tensor, in_features: int) -> None:
    """Refuse a Hessian that is not a finite ``[in_features, in_features]`` matrix."""
    if hessian.dim() != 2 or hessian.shape[0] != hessian.shape[1]:
        raise UserInputError(
            f"the Hessian must be a square [in, in] matrix, got {tuple(hessian.shape)};"
            " build it with HessianAccumulator on the layer's inputs"
        )
    if hessian.shape[0] != in_features:
        raise UserInputError(
            f"Hessian is {tuple(hessian.shape)} but the weight has {in_features} input columns;"
            " accumulate it from the inputs of this very layer"
        )
    if not bool(torch.isfinite(hessian).all()):
        raise UnsupportedModelError(
            "the Hessian contains NaN or Inf; the calibration inputs overflowed or hold NaN"
            " (run the calibration in float32 and check the data)"
        )


def dead_inputs(hessian: torch.Tensor) -> torch.Tensor:
    """``[in]`` bool: input channels that were always zero (``H_jj == 0``)."""
    return torch.diagonal(hessian) == 0


def inverse_cholesky(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor ``U`` of ``(H + damp * mean(diag H) * I)^-1`` (float32).

    Dead inputs must already have ``H_jj`` set to 1 (see :func:`dead_inputs`). The factor is
    computed in the Hessian's dtype (pass float64 for very ill-conditioned layers).
    """
    if not damp >= 0:
        raise UserInputError(f"damp must be >= 0, got {damp}; the usual value is 0.01")
    h = hessian.clone()
    diag = torch.diagonal(h)
    diag.add_(damp * float(diag.mean()))
    chol, info = torch.linalg.cholesky_ex(h)
    if int(info) == 0:
        inv = torch.cholesky_inverse(chol)
        upper, info = torch.linalg.cholesky_ex(inv, upper=True)
        if int(info) == 0:
            return upper.to(torch.float32)
    raise UnsupportedModelError(
        f"the damped Hessian (damp={damp}) is not positive definite; increase damp"
        " (e.g. 0.1), use more calibration samples, or accumulate in float64"
    )


def check_second_order(weight: torch.Tensor, hessian: torch.Tensor, block_size: int) -> None:
    """Argument checks shared by the second-order methods (GPTQ, SparseGPT)."""
    if weight.dim() != 2:
        raise UserInputError(
            f"expected a weight matrix [out, in], got shape {tuple(weight.shape)};"
            " pass slimtorch.formats.state.to_matrix(weight)"
        )
    check_hessian(hessian, weight.shape[1])
    if not bool(torch.isfinite(weight).all()):
        raise UnsupportedModelError("the weight contains NaN or Inf; fix the model first")
    if block_size < 1:
        raise ConfigError(f"block_size must be >= 1, got {block_size}; the usual value is 128")


def window(w: torch.Tensor, w1: torch.Tensor, i1: int, j: int, width: int) -> torch.Tensor:
    """Current values of ``width`` columns from block column ``j`` on (block ``w1`` at ``i1``):
    the lazy-update column loops of GPTQ and SparseGPT read a group ahead of the block."""
    part = w1[:, j : j + width]
    need = width - part.shape[1]
    if need > 0:
        end = i1 + w1.shape[1]
        part = torch.cat([part, w[:, end : end + need]], dim=1)
    return part


def expert_statistics(block: nn.Module, stats: dict[str, Any]) -> dict[str, Any]:
    """``stats`` (layer name in ``block`` -> accumulator), its accumulators of layers that
    belong to one expert of a mixture-of-experts layer marked ``data_free``: when the router
    sends no calibration token to that expert they give neutral statistics (identity Hessian,
    unit input norms), so GPTQ rounds the expert to nearest (RTN on the same grid) and
    SparseGPT/Wanda prune it by magnitude, instead of failing or producing NaN. Any other
    layer that saw nothing is still refused when its statistics are read (a data bug)."""
    for rel, acc in stats.items():
        parent = rel.split(":")[0].rpartition(".")[0]
        if isinstance(acc, _ChannelAccumulator) and parent:
            acc.data_free = isinstance(block.get_submodule(parent), ExpertMLP)
    return stats


def shared_links(stats: dict[str, Any]) -> dict[str, str]:
    """Each key of ``stats`` -> the first key (sorted) holding the same accumulator: the layers
    that read one input share one (``observe_block``)."""
    first: dict[int, str] = {}
    return {key: first.setdefault(id(stats[key]), key) for key in sorted(stats)}


def agree_shared(stats: dict[str, Any], every: Sequence[dict[str, str]]) -> None:
    """Join the accumulators that :func:`shared_links` of any rank (``every``) shares, so all
    ranks combine the same ones. A group reads one tensor whenever it runs, so ranks differ
    only where one never ran it (an expert no token of its shard reached): those accumulators
    are empty and are joined. A fed one seen alone here cannot be: refused."""
    for links in every:
        for key, lead in sorted(links.items()):
            if stats[key] is stats[lead]:
                continue
            if getattr(stats[key], "count", 0):
                raise UnsupportedModelError(
                    f"{key} read the same input as {lead} on one rank and another one here;"
                    " run this model's calibration in one process"
                )
            stats[key] = stats[lead]


def share_data_free(compressors: Sequence[Any], comm: Any | None) -> list[str]:
    """The layers ``compressors`` compressed data-free (their ``data_free`` lists, see
    :func:`starved`), sorted, each once. With ``comm`` (a distributed run, where each layer is
    noted on its owner rank only) the union over the ranks: a collective (``gather_json``),
    every rank calls it. Each list becomes its union in place (it is the run's note,
    ``Run.data_free``, that the artifact's ``data_free_layers`` records)."""
    held = [names for c in compressors if isinstance(names := getattr(c, "data_free", None), list)]
    lists = {id(names): names for names in held}
    found: set[str] = set()
    for names in lists.values():  # the same order on every rank: the compressors'
        union = sorted(set(names))
        if comm is not None:
            union = sorted({n for part in comm.gather_json(union) for n in part})
        names[:] = union
        found.update(union)
    return sorted(found)


def starved(block_name: str, stats: dict[str, Any], keys: list[str]) -> list[str]:
    """Full names of the ``keys`` whose accumulators fell back to neutral statistics (experts
    no calibration token reached; see :func:`expert_statistics`), for the run's note."""
    return [
        f"{block_name}.{k}" if block_name else k
        for k in keys
        if isinstance(acc := stats[k], _ChannelAccumulator) and acc.data_free and not acc.count
    ]
