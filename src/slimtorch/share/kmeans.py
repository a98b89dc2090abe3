"""Exact Lloyd k-means in one dimension, for weight sharing (Deep Compression, Han et al. 2016).

Weights are scalars, so k-means needs no distance matrix. The values are sorted once; after
that a cluster is a contiguous run of the sorted values, an assignment step is one
``searchsorted`` of the k - 1 midpoints between sorted centroids, and an update step reads
counts, sums and sums of squares of every run from float64 prefix sums. An iteration therefore
costs O(k log n) on top of the O(n log n) sort, and it is *exact* Lloyd: the same fixed points,
from the same start, as the O(nk) algorithm (ties go to the lower centroid).

Inits, as discussed in section 3.2 of the paper:

* ``linear``: k points evenly spaced between the minimum and the maximum (the paper's choice,
  it keeps centroids for the rare large weights);
* ``density``: the quantiles at (i + 1/2)/k of the (weighted) empirical CDF;
* ``kmeans++``: greedy D^2 sampling (Arthur & Vassilvitskii 2007; 2 + ln k candidates per step,
  as scikit-learn does), seeded and deterministic; a candidate is drawn and scored in
  O(sqrt(run) + k log n);
* ``cuberoot`` (not in the paper): the quantiles of p^(1/3), the asymptotically optimal point
  density of a mean-squared-error quantizer (Panter & Dite 1951; Gersho 1979), estimated from
  equal-count blocks of the sorted values. Deterministic, O(n / block), and in our benchmarks
  the lowest inertia of the four after Lloyd.

Empty clusters are re-seeded before each update step: the non-empty run with the largest
within-cluster sum of squares is split in two at its best (least-SSE) cut, repeated until k runs
are non-empty, so the inertia never goes up. When ``k`` is at least the number of distinct
values, the distinct values themselves are returned (inertia 0). Samples with zero weight take
no part in the fit but still get a label. Values are rounded to float32 first (the codebook is
float32); all arithmetic is float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np
import torch
from torch import Tensor

from slimtorch.core.errors import UserInputError

Init = Literal["linear", "density", "kmeans++", "cuberoot"]
INITS: tuple[str, ...] = get_args(Init)
ROUNDS, TRIES = 8, 2  # split-merge refinement: rounds, moves tried (with Lloyd) per round


@dataclass(frozen=True)
class KMeansResult:
    """``centroids`` float32 [k'] ascending (k' < k only when there are fewer distinct values);
    ``labels`` int64 [n] index into ``centroids``; ``inertia`` = sum_i w_i (x_i - c[label_i])^2
    in float64 with the returned float32 centroids; ``iterations`` = update steps run;
    ``history`` = inertia after each update step, from prefix sums (non-increasing for
    plain Lloyd; with refinement each accepted move appends its own Lloyd run)."""

    centroids: Tensor
    labels: Tensor
    inertia: float
    iterations: int
    history: tuple[float, ...] = ()


@dataclass(frozen=True)
class _Sorted:
    """Positive-weight values, shifted by their weighted mean, sorted, with prefix sums.

    numpy inside: every step works on k-sized arrays, where numpy's per-call cost is a few
    times lower than torch's."""

    values: np.ndarray  # float64 [m] ascending
    cw: np.ndarray  # float64 [m + 1] prefix sums of weights, from 0
    cx: np.ndarray  # of w * x
    cxx: np.ndarray  # of w * x^2
    shift: float
    distinct: int  # distinct float32 values

    def stats(self, bounds: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Weight, sum and sum of squares of each run ``[bounds[..., i], bounds[..., i + 1])``."""
        lo, hi = bounds[..., :-1], bounds[..., 1:]
        return self.cw[hi] - self.cw[lo], self.cx[hi] - self.cx[lo], self.cxx[hi] - self.cxx[lo]

    def cost(self, bounds: np.ndarray, c: np.ndarray) -> np.ndarray:
        """sum w (x - c_i)^2 over each run i, for centroids ``c`` (clamped at 0)."""
        cnt, s, ss = self.stats(bounds)
        return np.maximum(ss - 2 * c * s + c * c * cnt, 0.0)


def _check(values: Tensor, weights: Tensor | None) -> tuple[Tensor, Tensor | None]:
    if not isinstance(values, Tensor) or values.dim() != 1 or not values.is_floating_point():
        raise UserInputError("values must be a 1-D float tensor; pass weight.detach().flatten()")
    if values.numel() == 0:
        raise UserInputError("values is empty; k-means needs at least one value to cluster")
    v = values.detach().to("cpu", torch.float32)
    if not bool(torch.isfinite(v).all()):
        raise UserInputError("values hold NaN or Inf; fix or mask those weights before k-means")
    if weights is None:
        return v, None
    if not isinstance(weights, Tensor) or weights.shape != values.shape:
        raise UserInputError("weights must be a tensor of the same shape as values, or None")
    w = weights.detach().to("cpu", torch.float64)
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()) or float(w.sum()) <= 0:
        raise UserInputError("weights must be finite, >= 0, and not all zero; fix the weights")
    return v, w


def _prepare(v: Tensor, w: Tensor | None) -> _Sorted:
    if w is None:
        sv, ws = np.sort(v.numpy()), None
    else:
        keep = w > 0
        vn, wn = v[keep].numpy(), w[keep].numpy()
        order = np.argsort(vn, kind="stable")
        sv, ws = vn[order], wn[order]
    distinct = 1 + int(np.count_nonzero(sv[1:] != sv[:-1]))
    x = sv.astype(np.float64)
    shift = float(x.mean() if ws is None else (ws * x).sum() / ws.sum())
    x -= shift
    wx = x if ws is None else ws * x
    cw = np.arange(x.size + 1, dtype=np.float64) if ws is None else _prefix(ws)
    return _Sorted(x, cw, _prefix(wx), _prefix(wx * x), shift, distinct)


def _prefix(t: np.ndarray) -> np.ndarray:
    out = np.empty(t.size + 1, dtype=np.float64)
    out[0] = 0.0
    np.cumsum(t, out=out[1:])
    return out


def _edges(data: _Sorted, c: np.ndarray) -> np.ndarray:
    """Run bounds [..., k + 1] for centroids ``c`` [..., k] sorted along the last axis; a
    value on a midpoint goes to the lower centroid."""
    inner = np.searchsorted(data.values, (c[..., :-1] + c[..., 1:]) / 2, side="right")
    pad = np.zeros((*c.shape[:-1], 1), dtype=inner.dtype)
    return np.concatenate([pad, inner, pad + data.values.size], axis=-1)


def _draw(data: _Sorted, bounds: np.ndarray, c: np.ndarray, total: np.ndarray, u: float) -> int:
    """Index of a value drawn with probability w (x - nearest centroid)^2, by inverting the
    cumulative cost: pick the run, then search it on a sqrt-spaced grid and refine."""
    t = u * total[-1]
    j = min(int(np.searchsorted(total, t, side="right")), c.size - 1)
    lo, hi, cj = int(bounds[j]), int(bounds[j + 1]), c[j]
    t -= total[j - 1] if j > 0 else 0.0
    base = data.cxx[lo] - 2 * cj * data.cx[lo] + cj * cj * data.cw[lo]

    def f(i: np.ndarray) -> np.ndarray:  # cost of run values lo .. i-1, monotone in i
        g = data.cxx[i] - 2 * cj * data.cx[i] + cj * cj * data.cw[i] - base
        return np.maximum.accumulate(g)

    step = max(1, math.isqrt(hi - lo))
    grid = np.append(np.arange(lo + step, hi, step), hi)
    g = min(int(np.searchsorted(f(grid), t, side="right")), grid.size - 1)
    fine = np.arange(grid[g - 1] + 1 if g > 0 else lo + 1, grid[g] + 1)
    i = min(int(np.searchsorted(f(fine), t, side="right")), fine.size - 1)
    return int(fine[i]) - 1


def _kmeanspp(data: _Sorted, k: int, rng: np.random.Generator) -> np.ndarray:
    """Greedy D^2 sampling as in scikit-learn: 2 + ln k candidates per step, keep the one that
    lowers the total cost most (each candidate is scored in O(k log n))."""
    x, trials = data.values, 2 + int(math.log(k))
    first = min(int(np.searchsorted(data.cw[1:], rng.random() * data.cw[-1], "right")), x.size - 1)
    centers = x[first : first + 1]
    bounds = _edges(data, centers)
    cost = data.cost(bounds, centers)
    for _ in range(1, k):
        total = np.cumsum(cost)
        if total[-1] <= 0:
            break
        cand = np.array([x[_draw(data, bounds, centers, total, u)] for u in rng.random(trials)])
        tried = np.sort(np.concatenate([np.tile(centers, (trials, 1)), cand[:, None]], 1), 1)
        tb = _edges(data, tried)
        tc = data.cost(tb, tried)
        best = int(np.argmin(tc.sum(1)))
        centers, bounds, cost = tried[best], tb[best], tc[best]
    return centers


def _cuberoot(data: _Sorted, k: int) -> np.ndarray:
    """Quantiles (i + 1/2)/k of G(x) = integral of p^(1/3): a block of mass m and width d
    adds (m / d)^(1/3) * d = (m d^2)^(1/3) to G, and G is linear inside a block."""
    x = data.values
    edges = np.append(np.arange(0, x.size - 1, max(1, x.size // (8 * k))), x.size - 1)
    mass, width = np.diff(data.cw[edges]), np.diff(x[edges])
    g = np.concatenate([[0.0], np.cumsum(np.cbrt(mass * width * width))])
    if g[-1] <= 0:  # all mass on a point: nothing to spread
        return np.full(k, x[0])
    return np.interp((np.arange(k) + 0.5) / k * g[-1], g, x[edges])


def _init(data: _Sorted, k: int, init: str, seed: int) -> np.ndarray:
    x = data.values
    if init == "linear":
        return np.linspace(x[0], x[-1], k)
    if init == "density":
        targets = (np.arange(k) + 0.5) / k * data.cw[-1]
        return x[np.minimum(np.searchsorted(data.cw[1:], targets), x.size - 1)]
    if init == "kmeans++":
        return _kmeanspp(data, k, np.random.default_rng(seed))
    if init == "cuberoot":
        return _cuberoot(data, k)
    raise UserInputError(f"unknown init {init!r}; choose one of {list(INITS)}")


def _sse(data: _Sorted, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Within-run sum of squares of runs [lo, hi) (each non-empty)."""
    cnt, sm = data.cw[hi] - data.cw[lo], data.cx[hi] - data.cx[lo]
    return data.cxx[hi] - data.cxx[lo] - sm * sm / np.maximum(cnt, 1e-300)


def _best_split(data: _Sorted, lo: int, hi: int) -> int:
    """Cut j in (lo, hi) minimising SSE([lo, j)) + SSE([j, hi)), never between equal values."""
    j = np.arange(lo + 1, hi)
    sse = _sse(data, np.full_like(j, lo), j) + _sse(data, j, np.full_like(j, hi))
    sse[data.values[j - 1] == data.values[j]] = math.inf
    return lo + 1 + int(np.argmin(sse))


def _fill_empty(data: _Sorted, bounds: np.ndarray, k: int) -> np.ndarray:
    """Drop empty runs and split the worst run until there are k non-empty runs again."""
    b = bounds[np.append(True, np.diff(bounds) > 0)]
    while b.size - 1 < k:
        cnt, s, ss = data.stats(b)
        sse = ss - s * s / cnt
        sse[data.values[b[:-1]] == data.values[b[1:] - 1]] = -math.inf  # one distinct value
        j = int(np.argmax(sse))
        b = np.insert(b, j + 1, _best_split(data, int(b[j]), int(b[j + 1])))
    return b


def _lloyd(
    data: _Sorted, c: np.ndarray, max_iter: int, tol: float
) -> tuple[np.ndarray, int, list[float]]:
    k = c.size
    bounds = _edges(data, np.sort(c))
    history: list[float] = []
    for it in range(1, max_iter + 1):
        bounds = _fill_empty(data, bounds, k)
        cnt, s, ss = data.stats(bounds)
        c = s / cnt
        history.append(max(float((ss - s * c).sum()), 0.0))
        new = _edges(data, c)
        if np.array_equal(new, bounds) or history[-1] == 0:
            return c, it, history
        if it > 1 and history[-2] - history[-1] <= tol * history[-2]:
            return c, it, history
        bounds = new
    return c, max_iter, history


def _moves(data: _Sorted, c: np.ndarray, tries: int) -> list[np.ndarray]:
    """Up to ``tries`` split-merge moves from the partition of ``c`` (merge two adjacent runs,
    split another at its best cut), the least SSE-increasing first, as run bounds. Split gains
    are screened on a grid of ~64 cuts per run; the chosen runs are then cut exactly."""
    k, x = c.size, data.values
    b = _fill_empty(data, _edges(data, c), k)
    sse = _sse(data, b[:-1], b[1:])
    merge = _sse(data, b[:-2], b[2:]) - sse[:-1] - sse[1:]
    p = np.arange(1, x.size, max(1, x.size // (64 * k)))
    run = np.searchsorted(b, p, side="right") - 1
    lo, hi = b[run], b[run + 1]
    gain = sse[run] - _sse(data, lo, p) - _sse(data, p, hi)
    gain[(p <= lo) | (x[p - 1] == x[p])] = -math.inf
    best = np.full(k, -math.inf)
    np.maximum.at(best, run, gain)
    delta = best[None, :] - merge[:, None]  # [merge pair i, split run j]
    i = np.arange(k - 1)[:, None]
    j = np.arange(k)[None, :]
    delta[(j == i) | (j == i + 1) | ~np.isfinite(delta)] = -math.inf
    out = []
    for flat in np.argsort(-delta, axis=None)[:tries]:
        mi, sj = divmod(int(flat), k)
        if delta[mi, sj] == -math.inf:
            break
        cut = _best_split(data, int(b[sj]), int(b[sj + 1]))
        out.append(np.sort(np.append(np.delete(b, mi + 1), cut)))
    return out


def _refine(
    data: _Sorted, c: np.ndarray, max_iter: int, tol: float, history: list[float]
) -> tuple[np.ndarray, int]:
    """Split-merge local search around Lloyd: try the 4 most promising moves, each followed by
    Lloyd, keep the best if it lowers the inertia; at most ROUNDS rounds."""
    iterations = 0
    for _ in range(min(c.size, ROUNDS) if c.size > 2 else 0):
        found = None
        for b in _moves(data, c, TRIES):
            cnt, s, _ss = data.stats(b)
            trial = _lloyd(data, s / cnt, max_iter, tol)
            iterations += trial[1]
            if trial[2][-1] < (found[2][-1] if found else history[-1]):
                found = trial
        if found is None:
            break
        c = found[0]
        history.extend(found[2])
    return c, iterations


def assign(values: Tensor, centroids: Tensor) -> Tensor:
    """Index of the nearest centroid for each value (int64, same shape); ties go to the lower
    centroid. ``centroids`` may be unsorted; labels index into it as given."""
    if centroids.dim() != 1 or centroids.numel() == 0:
        raise UserInputError("centroids must be a non-empty 1-D tensor (the codebook)")
    c_sorted, order = torch.sort(centroids.detach().to("cpu", torch.float64), stable=True)
    mids = (c_sorted[:-1] + c_sorted[1:]) / 2
    idx = torch.searchsorted(mids, values.detach().to("cpu", torch.float64).contiguous())
    return order[idx]


def init_centroids(
    values: Tensor, k: int, init: Init = "linear", seed: int = 0, weights: Tensor | None = None
) -> Tensor:
    """The sorted float64 starting centroids :func:`kmeans_1d` uses (for tests and studies)."""
    v, w = _check(values, weights)
    data = _prepare(v, w)
    return torch.from_numpy(np.sort(_init(data, k, init, seed)) + data.shift)


def kmeans_1d(
    values: Tensor,
    k: int,
    init: Init = "linear",
    max_iter: int = 100,
    tol: float = 1e-7,
    seed: int = 0,
    weights: Tensor | None = None,
    refine: bool = True,
) -> KMeansResult:
    """Exact (weighted) Lloyd k-means of scalar ``values`` into ``k`` clusters.

    Lloyd stops at a fixed point, after ``max_iter`` update steps, or when an update step lowers
    the inertia by at most ``tol`` times its previous value. With ``refine``, Lloyd's local
    minimum is then improved by split-merge moves (merge two adjacent clusters, split another at
    its best cut, run Lloyd again, keep it if the inertia drops; up to ROUNDS x TRIES tries), which
    escapes the many poor local minima of 1-D k-means on heavy-tailed weights. ``refine=False``
    is plain Lloyd from the chosen init.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise UserInputError(f"k must be an integer >= 1, got {k!r}; e.g. k = 2**bits")
    if init not in INITS:
        raise UserInputError(f"unknown init {init!r}; choose one of {list(INITS)}")
    if max_iter < 1 or not tol >= 0:
        raise UserInputError("max_iter must be >= 1 and tol >= 0; the defaults are 100 and 1e-7")
    v, w = _check(values, weights)
    data = _prepare(v, w)
    history: list[float] = []
    if data.distinct <= k:  # exact: the distinct positive-weight values themselves
        centroids, iterations = torch.unique(v if w is None else v[w > 0]), 0
    else:
        c64, iterations, history = _lloyd(data, _init(data, k, init, seed), max_iter, tol)
        if refine and history[-1] > 0:
            c64, more = _refine(data, c64, max_iter, tol, history)
            iterations += more
        centroids = torch.unique(
            torch.from_numpy(c64 + data.shift).float()
        )  # sorted; merges float32 duplicates
    labels = assign(v, centroids)
    err = (v.double() - centroids.double()[labels]) ** 2
    inertia = float(err.sum() if w is None else (w * err).sum())
    return KMeansResult(centroids, labels, inertia, iterations, tuple(history))
