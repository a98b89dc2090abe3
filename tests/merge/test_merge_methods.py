"""Merge maths on tiny tensors against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from slimtorch.merge import methods as M


def test_linear_weighted_average_and_sum() -> None:
    a, b = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 6.0])
    assert torch.equal(M.linear([a, b], [1.0, 3.0]), torch.tensor([2.5, 5.0]))
    assert torch.equal(M.linear([a, b], [1.0, 3.0], normalize=False), torch.tensor([10.0, 20.0]))


def test_linear_keeps_dtype_and_computes_in_float32() -> None:
    a = torch.tensor([1.0, 2.0], dtype=torch.bfloat16)
    out = M.linear([a, a * 3], [0.5, 0.5])
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, torch.tensor([2.0, 4.0], dtype=torch.bfloat16))


def test_linear_rejects_bad_inputs() -> None:
    with pytest.raises(ValueError, match="weights"):
        M.linear([torch.ones(2)], [1.0, 2.0])
    with pytest.raises(ValueError, match="shapes differ"):
        M.linear([torch.ones(2), torch.ones(3)], [1.0, 1.0])
    with pytest.raises(TypeError, match="floating-point"):
        M.linear([torch.ones(2, dtype=torch.int64)], [1.0])


def test_slerp_endpoints_and_midpoint() -> None:
    v0, v1 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    assert torch.allclose(M.slerp(0.0, v0, v1), v0, atol=1e-7)
    assert torch.allclose(M.slerp(1.0, v0, v1), v1, atol=1e-7)
    mid = M.slerp(0.5, v0, v1)
    s = math.sqrt(0.5)
    assert torch.allclose(mid, torch.tensor([s, s]), atol=1e-6)  # on the arc, not the chord
    assert abs(float(mid.norm()) - 1.0) < 1e-6


def test_slerp_scales_with_unnormalised_inputs() -> None:
    v0, v1 = torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 4.0]])
    mid = M.slerp(0.5, v0, v1)
    s = math.sqrt(0.5)
    assert torch.allclose(mid, torch.tensor([[2 * s, 4 * s]]), atol=1e-6)
    assert mid.shape == (1, 2)


def test_slerp_colinear_falls_back_to_lerp() -> None:
    v0 = torch.tensor([1.0, 2.0, 3.0])
    out = M.slerp(0.25, v0, 2 * v0)
    assert torch.allclose(out, 0.75 * v0 + 0.25 * 2 * v0, atol=1e-6)
    anti = M.slerp(0.5, v0, -v0)
    assert torch.allclose(anti, torch.zeros(3), atol=1e-6)


def test_task_arithmetic_hand_computed() -> None:
    base = torch.tensor([1.0, 1.0, 1.0])
    m1, m2 = torch.tensor([2.0, 1.0, 0.0]), torch.tensor([1.0, 3.0, 1.0])
    out = M.task_arithmetic(base, [m1, m2], [1.0, 0.5])
    assert torch.equal(out, torch.tensor([2.0, 2.0, 0.0]))
    norm = M.task_arithmetic(base, [m1, m2], [1.0, 1.0], normalize=True, lam=2.0)
    assert torch.equal(norm, torch.tensor([2.0, 3.0, 0.0]))


def test_ties_trims_elects_and_takes_disjoint_mean() -> None:
    base = torch.zeros(4)
    d1 = torch.tensor([3.0, -1.0, 0.5, -2.0])
    d2 = torch.tensor([-1.0, 2.0, 0.25, -4.0])
    # density 0.5 keeps 2 of 4: d1 -> [3, 0, 0, -2], d2 -> [0, 2, 0, -4]
    out = M.ties(base, [d1, d2], [1.0, 1.0], 0.5)
    # signs: +, +, (0 -> +), -; position 3 agrees in both -> mean of -2, -4
    assert torch.equal(out, torch.tensor([3.0, 2.0, 0.0, -3.0]))
    unnorm = M.ties(base, [d1, d2], [1.0, 1.0], 0.5, normalize=False)
    assert torch.equal(unnorm, torch.tensor([3.0, 2.0, 0.0, -6.0]))


def test_ties_sign_election_drops_minority() -> None:
    base = torch.ones(1)
    out = M.ties(base, [base + 3, base - 1], [1.0, 1.0], 1.0)
    assert torch.equal(out, torch.tensor([4.0]))  # +3 wins over -1; -1 excluded from the mean
    weighted = M.ties(base, [base + 3, base - 1], [0.25, 1.0], 1.0)
    # weighted deltas 0.75 and -1: the minus sign wins; result base + (-1)/1
    assert torch.equal(weighted, torch.tensor([0.0]))


def test_magnitude_sparsify_keeps_at_least_one() -> None:
    d = torch.tensor([0.1, -0.4, 0.3])
    assert torch.equal(M.magnitude_sparsify(d, 0.01), torch.tensor([0.0, -0.4, 0.0]))
    assert torch.equal(M.magnitude_sparsify(d, 0.0), torch.zeros(3))
    assert M.magnitude_sparsify(d, 1.0) is d


def test_dare_is_seeded_and_rescales() -> None:
    base = torch.zeros(1000)
    m = torch.full((1000,), 2.0)
    a = M.dare(base, [m], [1.0], 0.3, M.tensor_generator(7, "w"), rescale="density")
    b = M.dare(base, [m], [1.0], 0.3, M.tensor_generator(7, "w"), rescale="density")
    c = M.dare(base, [m], [1.0], 0.3, M.tensor_generator(8, "w"), rescale="density")
    assert torch.equal(a, b) and not torch.equal(a, c)
    kept = a != 0
    assert 0.25 < kept.float().mean() < 0.35
    assert torch.allclose(a[kept], torch.full_like(a[kept], 2.0 / 0.3))
    l1 = M.dare(base, [m], [1.0], 0.3, M.tensor_generator(7, "w"), rescale="l1")
    assert torch.equal(l1 != 0, kept)
    assert abs(float(l1.abs().sum()) - 2000.0) < 1e-2  # l1 norm of the delta preserved


def test_dare_exact_small_case() -> None:
    base = torch.tensor([0.0, 0.0, 0.0, 0.0])
    m1 = torch.tensor([1.0, 2.0, 3.0, 4.0])
    mask = torch.bernoulli(torch.full((4,), 0.5), generator=M.tensor_generator(0, "t"))
    out = M.dare(base, [m1], [1.0], 0.5, M.tensor_generator(0, "t"), rescale="density")
    assert torch.equal(out, m1 * mask / 0.5)


def test_dare_ties_uses_sign_election() -> None:
    base = torch.zeros(3)
    m1, m2 = torch.tensor([1.0, 1.0, 1.0]), torch.tensor([-3.0, -3.0, -3.0])
    out = M.dare(base, [m1, m2], [1.0, 1.0], 1.0, None, consensus=True)
    assert torch.equal(out, torch.full((3,), -3.0))
    summed = M.dare(base, [m1, m2], [1.0, 1.0], 1.0, None)
    assert torch.equal(summed, torch.full((3,), -2.0))


def test_task_merge_validates_counts() -> None:
    with pytest.raises(ValueError, match="weights"):
        M.task_merge(torch.zeros(2), [torch.ones(2)], [1.0, 2.0], [1.0])
    assert torch.equal(M.task_merge(torch.ones(2), [], [], []), torch.ones(2))


def test_tensor_generator_depends_on_name() -> None:
    a = torch.rand(4, generator=M.tensor_generator(0, "a"))
    b = torch.rand(4, generator=M.tensor_generator(0, "b"))
    assert not torch.equal(a, b)
