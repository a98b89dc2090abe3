"""Genetic search over channel permutations, beside the greedy swap search of
:mod:`slimtorch.prune.permutation` (the seed names both).

A permutation ``perm`` (int64 ``[C]``) reorders a weight's input channels as ``w[:, perm]`` (the
convention of :mod:`slimtorch.prune.permutation`). The search keeps a population of
permutations: the given starts (identity, the spread order, ...), mutated copies of them and
random orders (all seeded). Every generation keeps the ``elite`` best unchanged and breeds the
rest: two parents by tournament, order crossover (OX1: a slice of the first parent stays in place,
the other positions take the remaining channels in the second parent's order, so the child is a
permutation), then 1..``swaps`` random swaps of two channels in different groups of ``group``
consecutive slots (a swap inside a group changes nothing under N:M). Elitism means the best
permutation never gets worse, and the result is never worse than the best start.

Fitness functions map a batch of permutations ``[P, C]`` to one float64 value each, higher
better, and the search counts every permutation it scores (``evaluations``):

- :func:`nm_fitness`: the total ``|w|`` N:M magnitude pruning keeps (the objective of
  :func:`~slimtorch.prune.permutation.find_permutation`);
- :func:`index_fitness`: minus the bits of the positions of the kept weights of sparse weights as
  the artifact's coder stores them (its cheapest index plan: bitmask, packed or Huffman-coded
  relative indices, CSR; :mod:`slimtorch.formats.coded`): the order that makes a pruned
  weight's index compress best. The values' bits do not depend on the order.

:func:`swap_climb` is the greedy baseline for any fitness: random swaps, each kept when it does
not lower the fitness, one evaluation each.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from slimtorch.core.errors import ConfigError
from slimtorch.formats.coded import PART_OVERHEAD, plans

Fitness = Callable[[torch.Tensor], torch.Tensor]
_CHUNK = 1 << 23  # elements gathered at once when scoring a batch of permutations


@dataclass(frozen=True)
class GeneticOptions:
    """Population size, stopping rules (any that is set stops the search) and operators."""

    population: int = 32
    generations: int = 200
    max_evaluations: int | None = None
    time_budget: float | None = None  # seconds; makes the result depend on the machine
    elite: int = 2
    tournament: int = 3
    crossover: float = 0.9
    swaps: int = 3
    seed: int = 0

    def __post_init__(self) -> None:
        if self.population < 4 or not 1 <= self.elite < self.population:
            raise ConfigError(
                f"genetic search needs population >= 4 and 1 <= elite < population, got"
                f" population={self.population}, elite={self.elite}"
            )
        if self.generations < 1 or self.tournament < 1 or self.swaps < 1:
            raise ConfigError("genetic search needs generations, tournament and swaps >= 1")
        if not 0.0 <= self.crossover <= 1.0:
            raise ConfigError(f"crossover is a probability in [0, 1], got {self.crossover}")


@dataclass(frozen=True)
class GeneticResult:
    """The best permutation found, its fitness, the best start's, and what the search cost."""

    perm: torch.Tensor
    fitness: float
    start_fitness: float
    evaluations: int
    generations: int
    seconds: float
    history: list[float] = field(default_factory=list)  # best fitness after each generation


def order_crossover(p1: torch.Tensor, p2: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """OX1: ``p1[a:b]`` stays in place; the other slots take the rest in ``p2``'s order."""
    c = p1.numel()
    a, b = sorted(torch.randint(0, c + 1, (2,), generator=gen).tolist())
    child = torch.empty_like(p1)
    child[a:b] = p1[a:b]
    taken = torch.zeros(c, dtype=torch.bool)
    taken[p1[a:b]] = True
    rest = p2[~taken[p2]]
    child[:a] = rest[:a]
    child[b:] = rest[a:]
    return child


def swap_mutation(
    perm: torch.Tensor, swaps: int, gen: torch.Generator, group: int = 1
) -> torch.Tensor:
    """A copy of ``perm`` with ``swaps`` swaps of two slots in different groups of ``group``."""
    c = perm.numel()
    out = perm.clone()
    groups = c // group
    if groups < 2:
        return out
    for _ in range(swaps):
        s1 = int(torch.randint(0, c, (1,), generator=gen))
        g2 = (s1 // group + int(torch.randint(1, groups, (1,), generator=gen))) % groups
        s2 = g2 * group + int(torch.randint(0, group, (1,), generator=gen))
        out[[s1, s2]] = out[[s2, s1]]
    return out


def is_permutation(perm: torch.Tensor, c: int) -> bool:
    """Whether ``perm`` holds every index ``0..c-1`` exactly once."""
    return perm.numel() == c and bool(torch.equal(perm.sort().values, torch.arange(c)))


def _check_starts(starts: Sequence[torch.Tensor]) -> torch.Tensor:
    if not starts:
        raise ConfigError("genetic search needs at least one start permutation")
    c = starts[0].numel()
    bad = [i for i, s in enumerate(starts) if not is_permutation(s, c)]
    if bad:
        raise ConfigError(f"start permutations {bad} are not permutations of 0..{c - 1}")
    return torch.stack([s.to(torch.int64).cpu() for s in starts])


def _tournament(fit: torch.Tensor, k: int, gen: torch.Generator) -> int:
    pick = torch.randint(0, fit.numel(), (k,), generator=gen)
    return int(pick[fit[pick].argmax()])


def _initial(starts: torch.Tensor, opts: GeneticOptions, group: int, gen: torch.Generator
             ) -> torch.Tensor:  # fmt: skip
    c = starts.shape[1]
    pop = [*starts]
    while len(pop) < opts.population:
        if len(pop) % 2:
            base = starts[len(pop) % len(starts)]
            pop.append(swap_mutation(base, max(1, c // group // 4), gen, group))
        else:
            pop.append(torch.randperm(c, generator=gen))
    return torch.stack(pop[: max(opts.population, len(starts))])


def genetic_search(
    fitness: Fitness, starts: Sequence[torch.Tensor], options: GeneticOptions, group: int = 1
) -> GeneticResult:
    """Maximise ``fitness`` over permutations from ``starts`` (see the module docstring)."""
    clock = time.perf_counter()
    first = _check_starts(starts)
    gen = torch.Generator().manual_seed(options.seed)
    pop = _initial(first, options, group, gen)
    fit = fitness(pop).to(torch.float64)
    evaluations, start_fitness = pop.shape[0], float(fit[: first.shape[0]].max())
    history: list[float] = []
    for _ in range(options.generations):
        order = fit.argsort(descending=True)
        pop, fit = pop[order], fit[order]
        children = []
        for _ in range(options.population - options.elite):
            p1 = pop[_tournament(fit, options.tournament, gen)]
            if float(torch.rand((), generator=gen)) < options.crossover:
                p1 = order_crossover(p1, pop[_tournament(fit, options.tournament, gen)], gen)
            swaps = int(torch.randint(1, options.swaps + 1, (1,), generator=gen))
            children.append(swap_mutation(p1, swaps, gen, group))
        kids = torch.stack(children)
        pop = torch.cat([pop[: options.elite], kids])
        fit = torch.cat([fit[: options.elite], fitness(kids).to(torch.float64)])
        evaluations += kids.shape[0]
        history.append(float(fit.max()))
        if options.max_evaluations is not None and evaluations >= options.max_evaluations:
            break
        if options.time_budget is not None and time.perf_counter() - clock > options.time_budget:
            break
    best = int(fit.argmax())
    return GeneticResult(
        pop[best].clone(), float(fit[best]), start_fitness, evaluations, len(history),
        time.perf_counter() - clock, history,
    )  # fmt: skip


def swap_climb(
    fitness: Fitness,
    start: torch.Tensor,
    evaluations: int,
    seed: int = 0,
    group: int = 1,
    time_budget: float | None = None,
) -> GeneticResult:
    """Greedy baseline: ``evaluations`` random swaps (between groups of ``group``), each kept
    when the fitness does not drop; never worse than ``start``."""
    clock = time.perf_counter()
    perm = _check_starts([start])[0]
    gen = torch.Generator().manual_seed(seed)
    best = float(fitness(perm.unsqueeze(0))[0])
    begin, used = best, 1
    while used < evaluations:
        if time_budget is not None and time.perf_counter() - clock > time_budget:
            break
        cand = swap_mutation(perm, 1, gen, group)
        value = float(fitness(cand.unsqueeze(0))[0])
        used += 1
        if value >= best:
            perm, best = cand, value
    return GeneticResult(perm, best, begin, used, 0, time.perf_counter() - clock)


# fitness functions ---------------------------------------------------------------------------


def nm_fitness(matrices: Sequence[torch.Tensor], n: int, m: int) -> Fitness:
    """Total ``|w|`` N:M magnitude pruning keeps in ``matrices`` (``[rows_i, C]``, channel
    columns, e.g. :func:`~slimtorch.prune.permutation.channel_matrix`) under each order."""
    if not matrices or len({int(w.shape[-1]) for w in matrices}) != 1:
        raise ConfigError("nm_fitness needs matrices [rows_i, C] that share one C")
    a = torch.cat([w.detach().abs().to("cpu", torch.float32) for w in matrices])
    rows, c = a.shape
    if c % m or not 0 < n < m:
        raise ConfigError(f"{n}:{m} needs 0 < n < m and C={c} divisible by m")
    step = max(1, _CHUNK // max(1, rows * c))

    def score(perms: torch.Tensor) -> torch.Tensor:
        out = []
        for chunk in perms.split(step):
            vals = a[:, chunk].reshape(rows, chunk.shape[0], c // m, m)
            out.append(vals.topk(n, dim=-1).values.to(torch.float64).sum(dim=(0, 2, 3)))
        return torch.cat(out)

    return score


def index_bits(mask: np.ndarray) -> int:
    """Bits the artifact's coder spends on the positions of the kept weights of ``mask`` (a
    weight's mask, rows first): its cheapest index plan in :func:`slimtorch.formats.coded.plans`
    (bitmask, packed or Huffman-coded gaps of 1..8 bits, CSR, each with its part's header
    estimate); the values' bytes do not depend on the order and are left out."""
    if not mask.any():
        return 0
    flat = torch.from_numpy(np.ascontiguousarray(mask, dtype=bool).reshape(mask.shape[0], -1))
    return 8 * (plans(None, 8, flat, 0, "huffman")[0].size - PART_OVERHEAD)


def index_fitness(masks: Sequence[torch.Tensor]) -> Fitness:
    """Minus the total :func:`index_bits` of ``masks`` (bool ``[rows, C, inner]``: a weight in
    its own memory order with the channels on axis 1, e.g. a conv ``[out, C, kh * kw]``) with
    their channels reordered by each permutation."""
    if not masks or len({int(x.shape[1]) for x in masks}) != 1 or any(x.dim() != 3 for x in masks):
        raise ConfigError("index_fitness needs bool masks [rows, C, inner] that share one C")
    arrays = [x.detach().cpu().numpy().astype(bool) for x in masks]

    def score(perms: torch.Tensor) -> torch.Tensor:
        out = []
        for perm in perms.numpy():
            out.append(-float(sum(index_bits(x[:, perm]) for x in arrays)))
        return torch.tensor(out, dtype=torch.float64)

    return score


def density_order(masks: Sequence[torch.Tensor]) -> torch.Tensor:
    """Channels by decreasing count of kept weights (a cheap start for :func:`index_fitness`)."""
    kept = sum(x.to(torch.int64).sum(dim=(0, 2)) for x in masks)
    assert isinstance(kept, torch.Tensor)
    return kept.argsort(descending=True, stable=True)


def budget_generations(evaluations: int, options: GeneticOptions) -> int:
    """Generations that spend about ``evaluations`` fitness evaluations with ``options``."""
    per = options.population - options.elite
    return max(1, math.ceil((evaluations - options.population) / per))


def spread_order(a: torch.Tensor, m: int) -> torch.Tensor:
    """Channels of ``a [rows, C]`` ranked by total ``|w|``, dealt round-robin over the ``C / m``
    groups (the greedy search's start too)."""
    rank = a.abs().sum(dim=0).argsort(descending=True, stable=True)
    return rank.view(m, -1).T.reshape(-1).contiguous()


def genetic_permutation(
    matrices: Sequence[torch.Tensor], n: int, m: int, options: GeneticOptions
) -> GeneticResult:
    """Genetic N:M channel permutation of ``matrices`` (``[rows_i, C]``) from the identity and
    the spread order; ``start_fitness`` is the better of the two, ``fitness`` the kept ``|w|``."""
    fitness = nm_fitness(matrices, n, m)
    a = torch.cat([w.detach().abs().to("cpu", torch.float32) for w in matrices])
    starts = [torch.arange(a.shape[1]), spread_order(a, m)]
    return genetic_search(fitness, starts, options, group=m)
