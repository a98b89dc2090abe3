"""Semi-structured N:M sparsity: in every group of ``m`` consecutive input weights keep ``n``.

Groups run along the input dimension of the matrix view ``[out, in]``
(:func:`slimtorch.graph.weights.to_matrix`): for Linear, Embedding (the embedding dimension),
MultiheadAttention projections and LSTM/GRU gates that is the last axis; for convolutions the
input channel is made the fastest-varying axis, so a group holds ``m`` consecutive input channels
at one kernel position (the layout sparse tensor cores expect, e.g. 2:4).
"""

from __future__ import annotations

import torch

from slimtorch.core.errors import ConfigError
from slimtorch.graph.weights import from_matrix, to_matrix


def check_nm(n: int, m: int) -> None:
    """Refuse an N:M pattern that is not ``0 < n < m``."""
    if not 0 < n < m:
        raise ConfigError(f"N:M sparsity needs 0 < n < m, got n={n}, m={m}; e.g. n=2, m=4")


def input_size(w: torch.Tensor) -> int:
    """The size N:M groups must divide: input channels for convs, else the matrix-view width."""
    if w.dim() > 2:
        return int(w.shape[1])
    return int(to_matrix(w).shape[1])


def nm_mask(
    w: torch.Tensor,
    n: int,
    m: int,
    name: str = "weight",
    prior: torch.Tensor | None = None,
) -> torch.Tensor:
    """Keep-mask with the ``n`` largest ``|w|`` of every ``m`` consecutive input weights.

    Ties keep the earlier position. ``prior`` entries already pruned rank lowest and stay pruned.
    ``name`` (the module name, as ``ignore`` takes it) labels the layer in the error raised when its input size is not a multiple of ``m``.
    """
    check_nm(n, m)
    size = input_size(w)
    if size % m:
        raise ConfigError(
            f"cannot apply {n}:{m} sparsity to layer {name!r}: its input size {size} is not divisible"
            f" by m={m}; add it to `ignore` or choose an m that divides {size}"
        )
    scores = w.detach().abs().to(torch.float32)
    if prior is not None:
        scores = scores.masked_fill(~prior.to(torch.bool), -1.0)
    mat = to_matrix(scores)
    groups = mat.reshape(-1, m)
    order = torch.sort(groups, dim=1, descending=True, stable=True).indices
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(1, order[:, :n], True)
    mask = from_matrix(keep.reshape(mat.shape), w.shape)
    if prior is not None:
        mask = mask & prior.to(torch.bool)
    return mask


def is_nm_sparse(w: torch.Tensor, n: int, m: int) -> bool:
    """Whether every group of ``m`` consecutive input weights has at most ``n`` non-zeros.

    False when the input size is not a multiple of ``m`` (no N:M layout exists).
    """
    check_nm(n, m)
    if input_size(w) % m:
        return False
    groups = to_matrix(w.detach()).reshape(-1, m)
    return bool(((groups != 0).sum(dim=1) <= n).all())
