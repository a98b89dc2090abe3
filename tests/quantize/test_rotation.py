"""Rotation maths: Hadamard constructions, orthogonality, the weight transforms (the runtime
modules: tests/runtime/test_runtime_rotation.py)."""

from __future__ import annotations

import math

import pytest
import torch

from slimtorch.core.errors import ConfigError
from slimtorch.quantize.rotation import (
    fold_scale_into_inputs,
    hadamard_factor,
    hadamard_matrix,
    head_blocks,
    orthogonal,
    paley_hadamard,
    rotate_inputs,
    rotate_outputs,
    sylvester_hadamard,
)
from slimtorch.runtime.act_quant import fake_quantize_tokens


@pytest.mark.parametrize("n", [1, 2, 4, 12, 20, 28, 36, 40, 44, 72, 96, 576, 640])
def test_hadamard_matrices_are_hadamard(n: int) -> None:
    h = hadamard_matrix(n)
    assert h.shape == (n, n) and bool((h.abs() == 1).all())
    assert torch.equal(h @ h.T, n * torch.eye(n, dtype=torch.float64))


def test_factors_of_the_real_widths() -> None:
    # SmolLM2-135M: hidden 576 = 36 * 16, MLP 1536 = 12 * 128; Llama-2-7B MLP 11008 = 172 * 64
    assert hadamard_factor(576) == 36 and hadamard_factor(1536) == 12
    assert hadamard_factor(4096) == 1 and hadamard_factor(640) == 20
    assert paley_hadamard(12) is not None and paley_hadamard(36) is not None  # Paley I, II
    assert paley_hadamard(16) is None and hadamard_factor(100) is None
    with pytest.raises(ConfigError, match="rotation: random"):
        hadamard_matrix(100)
    with pytest.raises(ConfigError, match="power of two"):
        sylvester_hadamard(6)


@pytest.mark.parametrize("kind", ["hadamard", "random"])
def test_orthogonal_is_orthogonal_and_seeded(kind: str) -> None:
    q = orthogonal(72, kind, seed=3)  # type: ignore[arg-type]
    assert torch.allclose(q @ q.T, torch.eye(72, dtype=torch.float64), atol=1e-12)
    assert torch.equal(q, orthogonal(72, kind, seed=3))  # type: ignore[arg-type]
    assert not torch.equal(q, orthogonal(72, kind, seed=4))  # type: ignore[arg-type]
    if kind == "hadamard":  # +-1/sqrt(n): every input spreads evenly over every output
        assert torch.allclose(q.abs(), torch.full_like(q, 1 / math.sqrt(72)))


def test_rotation_spreads_an_outlier_channel() -> None:
    x = torch.randn(64, 576, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x[:, 7] = 100.0  # one channel 100x the others: per-token int4 rounds the rest to zero
    ratio = lambda v: float((v.abs().amax(-1) / v.pow(2).mean(-1).sqrt()).mean())  # noqa: E731
    rotated = x @ orthogonal(576, "hadamard", 0)
    assert ratio(x) > 15 and ratio(rotated) < 5
    err = lambda v: float((fake_quantize_tokens(v.float(), 4) - v.float()).norm() / v.norm())  # noqa: E731
    assert err(rotated) < 0.5 * err(x)


def test_weight_transforms_keep_the_function() -> None:
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(5, 12, generator=gen), torch.randn(7, 12, generator=gen)
    b = torch.randn(7, generator=gen)
    q = orthogonal(12, "hadamard", 1).float()
    assert torch.allclose((x @ q) @ rotate_inputs(w, q).T, x @ w.T, atol=1e-5)
    w2, b2 = rotate_outputs(w, b, orthogonal(7, "random", 1))
    q7 = orthogonal(7, "random", 1).float()
    assert b2 is not None and torch.allclose(x @ w2.T + b2, (x @ w.T + b) @ q7, atol=1e-5)
    g = torch.rand(12, generator=gen) + 0.5
    assert torch.allclose(x @ fold_scale_into_inputs(w, g).T, (x * g) @ w.T, atol=1e-5)
    r = orthogonal(4, "hadamard", 0)
    blocks = head_blocks(r, 3)
    assert blocks.shape == (12, 12) and torch.equal(blocks[4:8, 4:8], r)
