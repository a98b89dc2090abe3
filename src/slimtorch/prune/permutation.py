"""Channel permutations for N:M sparsity (Pool & Yu, NeurIPS 2021).

N:M groups run along consecutive input columns of a weight's matrix view. The input channels of a
layer may be reordered freely when the layer that produces them reorders its outputs the same
way, so the network computes the same function. This module searches the order that maximises the
total ``|w|`` N:M magnitude pruning keeps; several matrices that read the same channels (e.g. the
q, k, v projections) share one order and the objective is the sum over them.

Convention: a permutation ``perm`` (int64 ``[C]``) reorders columns as ``w[:, perm]``: new column
``s`` is old column ``perm[s]``. The producer applies ``w_prod[perm]`` (and ``bias[perm]``).

Search: start from the better of the identity and a spread order (channels ranked by their total
``|w|`` dealt round-robin over the groups, so large channels do not share a group), then climb by
swapping channels between groups. For every slot ``s`` and channel ``c`` a table holds the gain of
putting ``c`` into ``s``: with ``t`` the n-th largest of the other ``m - 1`` entries of the group
in a row, the row keeps ``(top n-1 of the others) + max(|w_c|, t)``, so the table is one
max-and-sum over rows. The gain of swapping two slots is the sum of two table entries, so every
swap is scored at once; the best disjoint improving swaps are taken and only the rows of the
groups they touch are recomputed. At a local optimum a few random swaps kick the search out
(seeded), and the best order seen is returned.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from slimtorch.core.errors import ConfigError
from slimtorch.graph.weights import to_matrix
from slimtorch.prune.nm import check_nm, input_size

log = logging.getLogger(__name__)

_CHUNK = 1 << 22  # elements per block when computing group statistics
_BLOCK = 1 << 18  # elements per broadcast block of the table (fits in cache)
_SLOTS = 16  # slots per block of the table
_KICK = 4  # a kick swaps about one pair of groups in _KICK


@dataclass(frozen=True)
class PermutationSearch:
    """Result of :func:`find_permutation`: the order and the kept magnitude before and after."""

    perm: torch.Tensor
    kept: float
    identity_kept: float
    swaps: int
    seconds: float

    @property
    def gain(self) -> float:
        """Relative increase of the kept magnitude over the identity order."""
        return self.kept / self.identity_kept - 1.0 if self.identity_kept > 0 else 0.0


def _check_columns(c: int, n: int, m: int) -> None:
    check_nm(n, m)
    if c % m:
        raise ConfigError(
            f"cannot search a {n}:{m} channel permutation over {c} input columns: {c} is not"
            f" divisible by m={m}; leave this layer out or choose an m that divides {c}"
        )


def channel_matrix(w: torch.Tensor) -> torch.Tensor:
    """A weight as ``[rows, C]`` with one column per input channel and N:M groups along rows.

    Linear (and Embedding, RNN gates): the matrix view. Convolutions: the matrix view puts the
    input channel fastest, so its N:M groups are ``m`` consecutive channels at one kernel
    position; reshaping to ``[out * kernel, C]`` keeps exactly those groups, and permuting its
    columns is permuting the conv's input channels (``w[:, perm]``).
    """
    return to_matrix(w).reshape(-1, input_size(w))


def nm_kept_magnitude(w: torch.Tensor, n: int, m: int) -> float:
    """Sum of ``|w|`` that N:M magnitude pruning along the columns of ``w [out, C]`` keeps."""
    if w.dim() != 2:
        raise ConfigError(
            f"expected a matrix [out, C], got shape {tuple(w.shape)}; use channel_matrix"
        )
    _check_columns(int(w.shape[1]), n, m)
    groups = w.detach().abs().to(torch.float64).reshape(w.shape[0], -1, m)
    return float(groups.topk(n, dim=-1).values.sum())


def permuted_kept_magnitude(
    matrices: Sequence[torch.Tensor], perm: torch.Tensor, n: int, m: int
) -> float:
    """Total kept magnitude of ``matrices`` with their columns reordered by ``perm``."""
    return sum(nm_kept_magnitude(w[:, perm], n, m) for w in matrices)


def _stack(matrices: Sequence[torch.Tensor], m: int, n: int) -> torch.Tensor:
    if not matrices:
        raise ConfigError("search_permutation needs at least one matrix [out, C]")
    widths = {int(w.shape[-1]) for w in matrices}
    if any(w.dim() != 2 for w in matrices) or len(widths) != 1:
        shapes = [tuple(w.shape) for w in matrices]
        raise ConfigError(
            f"matrices sharing a channel order must all be [out_i, C] with one C; got {shapes}"
            " (convert conv weights with channel_matrix)"
        )
    _check_columns(widths.pop(), n, m)
    return torch.cat([w.detach().abs().to("cpu", torch.float32) for w in matrices])


def _group_parts(
    a: torch.Tensor, perm: torch.Tensor, groups: torch.Tensor, n: int, m: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For ``groups``: kept value ``f [k]``, and per slot ``base [k*m]`` and ``t [R, k*m]``.

    Putting channel ``c`` into slot ``s`` keeps ``base[s] + sum_r max(a[r, c], t[r, s])``.
    """
    vals = a[:, perm.view(-1, m)[groups]]  # [R, k, m]
    kept = vals.topk(n, dim=-1).values.sum(dim=(0, 2))
    eye = torch.eye(m, dtype=torch.bool)
    others = vals.unsqueeze(2).expand(-1, -1, m, -1).masked_fill(eye, -1.0)  # [R, k, m, m]
    top = others.topk(n, dim=-1).values  # n of the m-1 others, descending
    base = top[..., : n - 1].sum(dim=(0, 3)).reshape(-1)
    return kept, base, top[..., n - 1].reshape(a.shape[0], -1)


def _max_sum(t: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """``out[s, c] = sum_r max(a[r, c], t[r, s])``, in cache-sized blocks of slots and rows."""
    rows, cols = a.shape
    tt = t.T.contiguous()
    out = torch.zeros(tt.shape[0], cols, dtype=a.dtype)
    for s in range(0, tt.shape[0], _SLOTS):
        block = out[s : s + _SLOTS]
        step = max(1, _BLOCK // (block.shape[0] * cols))
        for r in range(0, rows, step):
            part = torch.maximum(
                a[r : r + step].unsqueeze(0), tt[s : s + _SLOTS, r : r + step, None]
            )
            block += part.sum(dim=1)
    return out


class _State:
    """Current order, kept value per group, and the gain table ``u[slot, channel]``."""

    def __init__(self, a: torch.Tensor, perm: torch.Tensor, n: int, m: int) -> None:
        self.a, self.perm, self.n, self.m = a, perm.clone(), n, m
        g = perm.numel() // m
        self.kept = torch.zeros(g, dtype=torch.float32)
        self.u = torch.zeros(perm.numel(), perm.numel(), dtype=torch.float32)
        self.refresh(torch.arange(g))

    def refresh(self, groups: torch.Tensor) -> None:
        step = max(1, _CHUNK // (self.a.shape[0] * self.m * self.m))
        for chunk in groups.split(step):
            kept, base, t = _group_parts(self.a, self.perm, chunk, self.n, self.m)
            self.kept[chunk] = kept
            slots = (chunk.unsqueeze(1) * self.m + torch.arange(self.m)).reshape(-1)
            table = _max_sum(t, self.a) + base.unsqueeze(1)
            self.u[slots] = table - kept.repeat_interleave(self.m).unsqueeze(1)

    def swap(self, pairs: list[tuple[int, int]]) -> None:
        for s1, s2 in pairs:
            self.perm[[s1, s2]] = self.perm[[s2, s1]]
        touched = sorted({s // self.m for pair in pairs for s in pair})
        self.refresh(torch.tensor(touched, dtype=torch.int64))


def _best_swaps(state: _State, tol: float) -> list[tuple[int, int]]:
    """Improving swaps with the largest gains, at most one per group, from the current table."""
    m = state.m
    groups = state.perm.numel() // m
    v = state.u[:, state.perm]  # v[s1, s2]: gain at s1 of receiving the channel now in s2
    gain = (v + v.T).view(groups, m, groups, m)
    pair_best = gain.amax(dim=(1, 3)).triu_(1)  # best swap of each pair of groups g1 < g2
    values, flat = pair_best.flatten().topk(min(4 * groups, pair_best.numel()))
    used: set[int] = set()
    picked: list[tuple[int, int]] = []
    for value, idx in zip(values.tolist(), flat.tolist(), strict=True):
        if value <= tol:
            break
        g1, g2 = divmod(idx, groups)
        if g1 not in used and g2 not in used:
            used.update((g1, g2))
            p1, p2 = divmod(int(gain[g1, :, g2, :].argmax()), m)
            picked.append((g1 * m + p1, g2 * m + p2))
    return picked


def _spread_start(a: torch.Tensor, m: int) -> torch.Tensor:
    """Channels ranked by total ``|w|`` dealt round-robin: group g gets ranks g, g+G, ..."""
    groups = a.shape[1] // m
    rank = a.sum(dim=0).argsort(descending=True, stable=True)
    return rank.view(m, groups).T.reshape(-1).contiguous()


def _kick(state: _State, gen: torch.Generator, count: int) -> None:
    c, m = state.perm.numel(), state.m
    pairs: list[tuple[int, int]] = []
    used: set[int] = set()
    for s1, s2 in torch.randint(0, c, (count, 2), generator=gen).tolist():
        if s1 // m != s2 // m and not {s1 // m, s2 // m} & used:
            used.update((s1 // m, s2 // m))
            pairs.append((s1, s2))
    if pairs:
        state.swap(pairs)


def find_permutation(
    matrices: Sequence[torch.Tensor],
    n: int,
    m: int,
    *,
    max_iters: int = 10_000,
    seed: int = 0,
    time_budget: float | None = None,
    escapes: int = 8,
) -> PermutationSearch:
    """Search a column order of ``matrices`` (all ``[out_i, C]``) that keeps the most N:M ``|w|``.

    ``max_iters`` bounds the rounds of swaps (each round takes the best disjoint improving swaps),
    ``escapes`` the random kicks out of local optima, ``time_budget`` (seconds) the wall time
    (a budget makes the result depend on the machine's speed). Deterministic for a ``seed``
    otherwise. Never worse than the identity, which is returned when nothing better is found.
    """
    start = time.perf_counter()
    a = _stack(matrices, m, n)
    c = a.shape[1]
    identity = torch.arange(c)
    identity_kept = permuted_kept_magnitude(matrices, identity, n, m)
    spread = _spread_start(a, m)
    first = spread if permuted_kept_magnitude(matrices, spread, n, m) > identity_kept else identity
    state = _State(a, first, n, m)
    tol = 1e-6 * float(state.kept.max().clamp_min(1e-30))
    gen = torch.Generator().manual_seed(seed)
    best, best_kept, swaps, kicks = state.perm.clone(), float(state.kept.sum()), 0, 0
    for _ in range(max_iters):
        if time_budget is not None and time.perf_counter() - start > time_budget:
            break
        pairs = _best_swaps(state, tol)
        if pairs:
            state.swap(pairs)
            swaps += len(pairs)
            continue
        if float(state.kept.sum()) > best_kept + tol:
            best, best_kept = state.perm.clone(), float(state.kept.sum())
        if kicks >= escapes:
            break
        kicks += 1
        _kick(state, gen, max(2, c // m // _KICK))
    if float(state.kept.sum()) > best_kept + tol:
        best = state.perm.clone()
    kept = permuted_kept_magnitude(matrices, best, n, m)
    if kept <= identity_kept:
        best, kept = identity, identity_kept
    seconds = time.perf_counter() - start
    log.debug(
        "permutation search: %d swaps, %d kicks, %.3fs, kept %.6g -> %.6g",
        swaps,
        kicks,
        seconds,
        identity_kept,
        kept,
    )
    return PermutationSearch(best, kept, identity_kept, swaps, seconds)


def search_permutation(
    matrices: Sequence[torch.Tensor],
    n: int,
    m: int,
    *,
    max_iters: int = 10_000,
    seed: int = 0,
    time_budget: float | None = None,
) -> torch.Tensor:
    """The column order (int64 ``[C]``) of :func:`find_permutation`; apply as ``w[:, perm]``."""
    result = find_permutation(
        matrices, n, m, max_iters=max_iters, seed=seed, time_budget=time_budget
    )
    return result.perm
