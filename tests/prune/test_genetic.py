"""Genetic permutation search: valid operators, never worse than its start, seeded determinism,
the index objective, and the `search: genetic` / `objective: index` options of prune.permute."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import slimtorch as st
from slimtorch.core.context import Context
from slimtorch.core.errors import ConfigError
from slimtorch.core.info import update_info
from slimtorch.prune.criteria import magnitude_mask
from slimtorch.prune.genetic import (
    GeneticOptions,
    budget_generations,
    density_order,
    genetic_permutation,
    genetic_search,
    index_bits,
    index_fitness,
    is_permutation,
    nm_fitness,
    order_crossover,
    swap_climb,
    swap_mutation,
)
from slimtorch.prune.permutation import find_permutation, permuted_kept_magnitude


def test_crossover_and_mutation_keep_permutations() -> None:
    gen = torch.Generator().manual_seed(0)
    for c in (1, 2, 7, 64):
        p1, p2 = torch.randperm(c, generator=gen), torch.randperm(c, generator=gen)
        for _ in range(50):
            child = order_crossover(p1, p2, gen)
            assert is_permutation(child, c)
            assert is_permutation(swap_mutation(child, 5, gen, group=1), c)
    p = torch.arange(16)
    for _ in range(50):  # swaps cross groups of 4: the group partition always changes
        q = swap_mutation(p, 1, gen, group=4)
        assert is_permutation(q, 16)
        moved = torch.nonzero(q != p).flatten().tolist()
        assert len(moved) == 2 and moved[0] // 4 != moved[1] // 4


def test_order_crossover_keeps_a_slice_of_the_first_parent() -> None:
    p1, p2 = torch.arange(10), torch.arange(9, -1, -1)
    child = order_crossover(p1, p2, torch.Generator().manual_seed(3))
    same = (child == p1).nonzero().flatten()
    rest = child[child != p1]
    assert same.numel() > 0 or rest.numel() == 10
    assert rest.tolist() == sorted(rest.tolist(), reverse=True)  # p2's order for the rest


def _matrix(seed: int = 0, rows: int = 24, c: int = 32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rows, c, generator=gen) * torch.rand(c, generator=gen) ** 2


def test_never_worse_than_its_start_and_improves_nm() -> None:
    w = _matrix()
    fitness = nm_fitness([w], 2, 4)
    best_start = find_permutation([w], 2, 4).perm  # a strong start: the greedy optimum
    res = genetic_search(fitness, [best_start], GeneticOptions(population=8, generations=20), 4)
    assert res.fitness >= res.start_fitness == pytest.approx(float(fitness(best_start[None])[0]))
    weak = genetic_permutation([w], 2, 4, GeneticOptions(population=16, generations=40))
    assert weak.fitness > float(fitness(torch.arange(32)[None])[0])
    assert weak.fitness == pytest.approx(permuted_kept_magnitude([w], weak.perm, 2, 4), rel=1e-6)
    assert weak.history == sorted(weak.history) and weak.generations == 40
    assert weak.evaluations == 16 + 40 * 14 == 16 + budget_generations(576, GeneticOptions(16)) * 14


def test_seeded_determinism_and_budgets() -> None:
    fitness = nm_fitness([_matrix(1)], 2, 4)
    starts = [torch.arange(32)]
    a = genetic_search(fitness, starts, GeneticOptions(population=8, generations=15, seed=5), 4)
    b = genetic_search(fitness, starts, GeneticOptions(population=8, generations=15, seed=5), 4)
    c = genetic_search(fitness, starts, GeneticOptions(population=8, generations=15, seed=6), 4)
    assert torch.equal(a.perm, b.perm) and a.history == b.history
    assert not torch.equal(a.perm, c.perm)
    capped = GeneticOptions(population=8, generations=1000, max_evaluations=50)
    assert genetic_search(fitness, starts, capped, 4).evaluations == 8 + 7 * 6


def test_bad_options_and_starts() -> None:
    with pytest.raises(ConfigError, match="population >= 4"):
        GeneticOptions(population=2)
    with pytest.raises(ConfigError, match="not permutations"):
        genetic_search(nm_fitness([_matrix()], 2, 4), [torch.zeros(32, dtype=torch.int64)],
                       GeneticOptions())  # fmt: skip
    with pytest.raises(ConfigError, match="divisible"):
        nm_fitness([torch.ones(3, 6)], 2, 4)


def test_index_bits_and_fitness() -> None:
    mask = np.zeros(64, dtype=bool)
    assert index_bits(mask) == 0
    mask[::8] = True  # 8 gaps of 8: eight 4-bit symbols (4 bytes) + the part's 64-byte header
    assert index_bits(mask) == 8 * (4 + 64)
    # four dense channels spread among twelve sparse ones: together, the gaps are more regular
    gen = torch.Generator().manual_seed(0)
    density = torch.full((16,), 0.05)
    density[[1, 5, 9, 13]] = 0.9
    m = (torch.rand(200, 16, 1, generator=gen) < density[None, :, None]).contiguous()
    fit = index_fitness([m])
    order = density_order([m])
    assert set(order[:4].tolist()) == {1, 5, 9, 13}
    spread, grouped = float(fit(torch.arange(16)[None])[0]), float(fit(order[None])[0])
    assert spread == -2232 and grouped == -2648  # regular gaps beat grouping the dense channels
    climb = swap_climb(fit, order, 200, seed=0)
    assert climb.fitness > climb.start_fitness == grouped and climb.evaluations == 200
    ga = genetic_search(fit, [order, torch.arange(16)], GeneticOptions(8, 10))
    assert ga.start_fitness == spread and ga.fitness >= spread


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 8))
    update_info(model, input={"shape": [2, 16], "dtype": "float32"})
    return model


@pytest.mark.parametrize(
    ("options", "stage"),
    [
        ({"search": "genetic", "population": 8, "generations": 20}, "nm"),
        ({"search": "genetic", "objective": "index", "sparsity": 0.8, "generations": 5}, "index"),
        ({"objective": "index", "sparsity": 0.8, "generations": 5}, "index"),
    ],
)
def test_permute_stage_options_keep_the_function(options: dict[str, object], stage: str) -> None:
    model = _net()
    x = torch.randn(32, 16)
    with torch.no_grad():
        before = model(x)
    recipe = [{"method": "prune.permute", **options}]
    out = st.compress(model, recipe, data=None, ctx=Context(progress=False)).model
    assert isinstance(out, nn.Sequential)
    with torch.no_grad():
        torch.testing.assert_close(out(x), before, rtol=1e-5, atol=1e-5)
    old_layer, new_layer = model[2], out[2]
    assert isinstance(old_layer, nn.Linear) and isinstance(new_layer, nn.Linear)
    w_old, w_new = old_layer.weight.detach(), new_layer.weight.detach()
    if stage == "nm":
        assert permuted_kept_magnitude([w_new], torch.arange(64), 2, 4) > permuted_kept_magnitude(
            [w_old], torch.arange(64), 2, 4
        )
    else:
        bits = [index_bits(magnitude_mask(w, 0.8).numpy()) for w in (w_old, w_new)]
        assert bits[1] <= bits[0]
