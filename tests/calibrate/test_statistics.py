"""Streaming input statistics equal the batch-at-once computation; Hessian helpers."""

from __future__ import annotations

import pytest
import torch

from slimtorch.calibrate.statistics import (
    AbsMaxAccumulator,
    AbsMeanAccumulator,
    HessianAccumulator,
    InputNormAccumulator,
    check_hessian,
    dead_inputs,
    inverse_cholesky,
)
from slimtorch.core.errors import UnsupportedModelError, UserInputError


def _batches(seed: int = 0) -> tuple[list[torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    batches = [
        torch.randn(2, 5, 6, generator=g),  # [batch, seq, in]
        torch.randn(7, 6, generator=g),  # [tokens, in]
        torch.randn(1, 1, 3, 6, generator=g) * 10,  # rank 4
        torch.randn(0, 6),  # empty batch
    ]
    return batches, torch.cat([b.reshape(-1, 6) for b in batches])


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_hessian_streaming_equals_batch(dtype: str) -> None:
    batches, x = _batches()
    acc = HessianAccumulator(6, dtype=dtype)  # type: ignore[arg-type]
    for b in batches:
        acc.update(b)
    h = acc.hessian()
    assert acc.count == x.shape[0] == 20
    assert h.dtype == getattr(torch, dtype)
    x64 = x.to(torch.float64)
    expected = 2.0 / x.shape[0] * x64.T @ x64
    torch.testing.assert_close(h.to(torch.float64), expected, rtol=1e-5, atol=1e-4)
    assert torch.equal(h, h.T)


def test_channel_accumulators_equal_batch() -> None:
    batches, x = _batches(1)
    norm, amax, amean = InputNormAccumulator(6), AbsMaxAccumulator(6), AbsMeanAccumulator(6)
    for b in batches:
        for acc in (norm, amax, amean):
            acc.update(b)
    torch.testing.assert_close(norm.sq_norm(), x.pow(2).sum(0))
    torch.testing.assert_close(norm.mean_sq(), x.pow(2).mean(0))
    assert torch.equal(amax.absmax(), x.abs().amax(0))
    torch.testing.assert_close(amean.absmean(), x.abs().mean(0))


def test_accumulator_bad_inputs() -> None:
    acc = HessianAccumulator(4)
    with pytest.raises(UserInputError, match="no inputs"):
        acc.hessian()
    with pytest.raises(UserInputError, match=r"\[\.\.\., 4\]"):
        acc.update(torch.randn(3, 5))
    acc.update(torch.tensor([[1.0, float("nan"), 0.0, 0.0]]))
    acc.update(torch.ones(2, 4))
    with pytest.raises(UnsupportedModelError, match="NaN"):
        acc.hessian()  # checked once, when read
    for bad in (InputNormAccumulator(4), AbsMaxAccumulator(4), AbsMeanAccumulator(4)):
        bad.update(torch.tensor([[1.0, float("inf"), 0.0, float("nan")]]))
        read = getattr(bad, {"InputNorm": "sq_norm", "AbsMax": "absmax"}.get(
            type(bad).__name__.removesuffix("Accumulator"), "absmean"))  # fmt: skip
        with pytest.raises(UnsupportedModelError, match="NaN"):
            read()
    with pytest.raises(UserInputError, match="float64"):
        InputNormAccumulator(4, dtype="float16")  # type: ignore[arg-type]
    with pytest.raises(UserInputError):
        AbsMaxAccumulator(0)
    with pytest.raises(UserInputError, match="no inputs"):
        AbsMeanAccumulator(3).absmean()


def test_inverse_cholesky_is_the_damped_inverse() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 8, generator=g, dtype=torch.float64)
    h = 2 / 50 * x.T @ x
    u = inverse_cholesky(h, 0.01).to(torch.float64)
    assert torch.equal(u, torch.triu(u))
    damped = h + 0.01 * torch.diagonal(h).mean() * torch.eye(8, dtype=torch.float64)
    torch.testing.assert_close(u.T @ u, torch.linalg.inv(damped), rtol=1e-5, atol=1e-6)


def test_hessian_helpers_refuse_bad_input() -> None:
    singular = torch.zeros(3, 3)
    singular[0, 0] = 1.0
    with pytest.raises(UnsupportedModelError, match="increase damp"):
        inverse_cholesky(singular, 0.0)
    with pytest.raises(UserInputError, match="damp"):
        inverse_cholesky(torch.eye(3), -0.1)
    with pytest.raises(UserInputError, match="square"):
        check_hessian(torch.zeros(3, 4), 3)
    with pytest.raises(UserInputError, match="4 input columns"):
        check_hessian(torch.eye(3), 4)
    with pytest.raises(UnsupportedModelError, match="NaN"):
        check_hessian(torch.full((2, 2), float("inf")), 2)
    assert dead_inputs(torch.diag(torch.tensor([1.0, 0.0, 2.0]))).tolist() == [False, True, False]
