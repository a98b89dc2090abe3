"""distill.losses: values against hand computations on tiny tensors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from slimtorch.core.errors import ConfigError
from slimtorch.distill.losses import (
    attention_map_loss,
    embedding_loss,
    hidden_state_loss,
    kd_loss,
    make_projection,
    masked_mean,
    mix_hard_soft,
    soft_target_loss,
)


def test_soft_target_zero_when_logits_equal_or_shifted() -> None:
    s = torch.tensor([[1.0, 2.0, 3.0], [0.5, -1.0, 0.0]])
    assert soft_target_loss(s, s.clone(), 2.0).item() == pytest.approx(0.0, abs=1e-7)
    # softmax is shift invariant per row
    assert soft_target_loss(s, s + 5.0, 4.0).item() == pytest.approx(0.0, abs=1e-6)


def test_soft_target_matches_hand_computation() -> None:
    s = torch.tensor([[0.0, 0.0]])
    t = torch.tensor([[2.0, 0.0]])
    T = 2.0
    p = [math.exp(1) / (math.exp(1) + 1), 1 / (math.exp(1) + 1)]  # softmax(t/T)
    kl = sum(pi * math.log(pi / 0.5) for pi in p)
    assert soft_target_loss(s, t, T).item() == pytest.approx(kl * T * T, rel=1e-6)
    # [B, L, V] logits average over every position
    s3, t3 = s.expand(2, 3, 2), t.expand(2, 3, 2)
    assert soft_target_loss(s3, t3, T).item() == pytest.approx(kl * T * T, rel=1e-6)


def _grad_norm(T: float, scale: bool) -> float:
    gen = torch.Generator().manual_seed(0)
    s = torch.randn(8, 10, generator=gen).requires_grad_(True)
    t = torch.randn(8, 10, generator=gen)
    loss = soft_target_loss(s, t, T)
    if not scale:
        loss = loss / T**2
    loss.backward()
    assert s.grad is not None
    return float(s.grad.norm())


def test_t_squared_keeps_gradient_scale() -> None:
    # With T^2 the gradient tends to (s - t) / (N * B) for large T: about constant in T.
    g4, g8, g16 = _grad_norm(4.0, True), _grad_norm(8.0, True), _grad_norm(16.0, True)
    assert g8 / g4 == pytest.approx(1.0, abs=0.1)
    assert g16 / g8 == pytest.approx(1.0, abs=0.05)
    # Without it the gradient would shrink as 1/T^2.
    assert _grad_norm(8.0, False) / _grad_norm(4.0, False) == pytest.approx(0.25, abs=0.03)


def test_kd_loss_mixes_hard_and_soft() -> None:
    gen = torch.Generator().manual_seed(1)
    s, t = torch.randn(4, 5, generator=gen), torch.randn(4, 5, generator=gen)
    y = torch.tensor([0, 1, 2, 3])
    hard = F.cross_entropy(s, y)
    soft = soft_target_loss(s, t, 3.0)
    assert kd_loss(s, t, y, 3.0, 0.0).item() == pytest.approx(hard.item())
    assert kd_loss(s, t, y, 3.0, 1.0).item() == pytest.approx(soft.item())
    assert kd_loss(s, t, y, 3.0, 0.25).item() == pytest.approx(0.25 * soft + 0.75 * hard)


def test_bad_inputs_raise() -> None:
    with pytest.raises(ConfigError, match="temperature"):
        soft_target_loss(torch.zeros(1, 2), torch.zeros(1, 2), 0.0)
    with pytest.raises(ConfigError, match="output size"):
        soft_target_loss(torch.zeros(1, 2), torch.zeros(1, 3), 1.0)
    with pytest.raises(ConfigError, match="alpha"):
        mix_hard_soft(torch.tensor(1.0), torch.tensor(1.0), 1.5)
    with pytest.raises(ConfigError, match="do not match"):
        hidden_state_loss(torch.zeros(2, 3, 4), torch.zeros(2, 5, 4))
    with pytest.raises(ConfigError, match="head counts"):
        attention_map_loss(torch.rand(1, 2, 3, 3), torch.rand(1, 4, 3, 3), heads="match")
    with pytest.raises(ConfigError, match="attention maps must be"):
        attention_map_loss(torch.rand(3, 3), torch.rand(3, 3))


def test_hidden_mse_and_cosine_with_mask() -> None:
    s = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])  # [1, 2, 2]
    t = torch.tensor([[[0.0, 0.0], [0.0, 1.0]]])
    # per position mse: (1 + 0)/2 = 0.5 and (0 + 1)/2 = 0.5
    assert hidden_state_loss(s, t, "mse").item() == pytest.approx(0.5)
    mask = torch.tensor([[0, 1]])
    assert hidden_state_loss(s, t, "mse", mask=mask).item() == pytest.approx(0.5)
    # cosine: position 2 points the same way (0), position 1 vs the zero vector -> 1
    assert hidden_state_loss(s, t, "cosine", mask=mask).item() == pytest.approx(0.0, abs=1e-6)
    assert hidden_state_loss(s, t, "cosine").item() == pytest.approx(0.5, abs=1e-6)
    assert embedding_loss(torch.eye(2), -torch.eye(2)).item() == pytest.approx(2.0)


def test_projection_shapes_and_gradient() -> None:
    assert make_projection(8, 8) is None
    proj = make_projection(4, 6)
    assert proj is not None and tuple(proj.weight.shape) == (6, 4)
    s = torch.randn(2, 3, 4, requires_grad=True)
    t = torch.randn(2, 3, 6)
    loss = hidden_state_loss(s, t, "mse", projection=proj)
    loss.backward()
    assert proj.weight.grad is not None and s.grad is not None
    assert tuple(s.grad.shape) == (2, 3, 4)


def test_attention_map_loss_kl_and_mse() -> None:
    t = torch.tensor([[[0.5, 0.5], [1.0, 0.0]]])  # [B=1, Lq=2, Lk=2], no head dim
    s = torch.tensor([[[0.25, 0.75], [1.0, 0.0]]])
    kl_row0 = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert attention_map_loss(s, t, "kl").item() == pytest.approx(kl_row0 / 2, rel=1e-5)
    assert attention_map_loss(s, t, "kl", mask=torch.tensor([[1, 0]])).item() == pytest.approx(
        kl_row0, rel=1e-5
    )
    assert attention_map_loss(s, t, "mse").item() == pytest.approx(0.0625 / 2)
    assert attention_map_loss(t, t, "kl").item() == pytest.approx(0.0, abs=1e-7)


def test_attention_heads_average_vs_match() -> None:
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    b = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    s = torch.stack([a, b]).unsqueeze(0)  # heads swapped relative to the teacher
    t = torch.stack([b, a]).unsqueeze(0)
    assert attention_map_loss(s, t, "mse", "average").item() == pytest.approx(0.0)
    assert attention_map_loss(s, t, "mse", "match").item() == pytest.approx(1.0)
    # different head counts are fine when averaged
    t6 = t.repeat(1, 3, 1, 1)
    assert attention_map_loss(s, t6, "mse", "average").item() == pytest.approx(0.0)


def test_masked_mean_ignores_masked_positions() -> None:
    v = torch.tensor([[1.0, 100.0], [3.0, 100.0]])
    assert masked_mean(v, torch.tensor([[1, 0], [1, 0]])).item() == pytest.approx(2.0)
    assert masked_mean(v, None).item() == pytest.approx(51.0)
