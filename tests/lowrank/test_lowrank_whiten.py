"""Data-whitened SVD (lowrank.svd with whiten: true) and its input statistics."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from slimtorch.core.context import Context
from slimtorch.core.errors import ConfigError, UnsupportedModelError, UserInputError
from slimtorch.core.methods import METHODS, Run
from slimtorch.lowrank import (
    LowRankConfig,
    factorize,
    input_grams,
    lowrank_model,
    truncated_svd,
    whitened_singular_values,
    whitened_svd,
    whitening_factor,
)
from slimtorch.runtime.lowrank import LowRankLinear

CTX = Context(progress=False)


def _anisotropic_inputs(n: int = 2000, dim: int = 16, seed: int = 0) -> torch.Tensor:
    """Rows ``[n, dim]`` whose channel scales span three orders of magnitude (like activations)."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(1, -2, dim, dtype=torch.float64)
    fixed = torch.Generator().manual_seed(1234)  # one distribution; ``seed`` draws samples
    mix, _ = torch.linalg.qr(torch.randn(dim, dim, generator=fixed, dtype=torch.float64))
    return (torch.randn(n, dim, generator=g, dtype=torch.float64) * scales) @ mix


def _out_err(w: torch.Tensor, approx: torch.Tensor, x: torch.Tensor) -> float:
    return torch.linalg.matrix_norm((w - approx) @ x.T).item()


def test_whitening_factor_is_the_damped_cholesky_factor() -> None:
    x = _anisotropic_inputs(200, 6)
    gram = x.T @ x
    s = whitening_factor(gram, damp=0.01)
    expect = gram + 0.01 * torch.diagonal(gram).mean() * torch.eye(6, dtype=torch.float64)
    torch.testing.assert_close(s @ s.T, expect)
    assert torch.equal(s, torch.tril(s))


@pytest.mark.parametrize(
    ("gram", "damp", "error", "match"),
    [
        (torch.ones(3, 4), 0.01, UnsupportedModelError, "square"),
        (torch.full((3, 3), float("nan")), 0.01, UserInputError, "NaN"),
        (torch.zeros(3, 3), 0.01, UserInputError, "all zero"),
        (torch.eye(3), 0.0, ConfigError, "damp"),
    ],
)
def test_bad_gram_or_damp_is_refused(gram: torch.Tensor, damp: float, error: type, match: str):
    with pytest.raises(error, match=match):
        whitening_factor(gram, damp)


def test_whitened_svd_is_exact_at_full_rank_and_shapes_match() -> None:
    w = torch.randn(10, 16, generator=torch.Generator().manual_seed(1))
    x = _anisotropic_inputs()
    a, b = whitened_svd(w, x.T @ x, rank=10, damp=1e-6)
    assert a.shape == (10, 10) and b.shape == (10, 16) and a.dtype == torch.float32
    assert (a @ b - w).abs().max().item() < 1e-3 * w.abs().max().item()
    with pytest.raises(UnsupportedModelError, match="does not match"):
        whitened_svd(w, torch.eye(10), rank=4)


def test_whitened_svd_minimises_output_error_far_below_plain_svd() -> None:
    w = torch.randn(12, 16, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    x = _anisotropic_inputs()
    gram = x.T @ x
    a, b = whitened_svd(w, gram, rank=4, damp=1e-8)
    pa, pb = truncated_svd(w, 4)
    white, plain = _out_err(w, a @ b, x), _out_err(w, pa @ pb, x)
    # Eckart-Young on W S: the error is the tail of W S's spectrum, and it beats plain SVD
    tail = whitened_singular_values(w, gram, damp=1e-8)[4:]
    assert white == pytest.approx(float(tail.square().sum().sqrt()), rel=1e-4)
    assert white < 0.5 * plain


class _Inputs:
    """A Task whose batches are ``(x [B, L, 16], mask [B, L])``; the last 2 positions are padding."""

    name = "inputs"

    def __init__(self) -> None:
        self.seen: list[torch.Tensor] = []

    def train_batches(self, ctx: Context, steps: int, batch_size: int) -> Any:
        x = _anisotropic_inputs(steps * batch_size * 5, 16).float()
        for i, chunk in enumerate(x.reshape(steps, batch_size, 5, 16)):
            chunk = chunk.clone()
            chunk[:, 3:] = 1000.0 + i  # padding: huge values that must not reach the Gram
            mask = torch.ones(batch_size, 5, dtype=torch.int64)
            mask[:, 3:] = 0
            self.seen.append(chunk[:, :3].reshape(-1, 16))
            yield chunk, mask

    def token_mask(self, batch: Any) -> torch.Tensor:
        return batch[1]

    def forward(self, model: nn.Module, batch: Any) -> Any:
        return model(batch[0])

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        return model(batch[0]).square().mean()


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16), nn.Linear(16, 4))


def test_input_grams_match_hand_computed_gram_without_padding() -> None:
    model, task = _mlp(), _Inputs()
    grams = input_grams(model, {"0": model[0], "2": model[2]}, task, CTX, batches=3, batch_size=4)
    x = torch.cat(task.seen).double()
    torch.testing.assert_close(grams["0"], x.T @ x, rtol=1e-5, atol=1e-3)
    hidden = torch.relu(model[0](x.float())).double()
    torch.testing.assert_close(grams["2"], hidden.T @ hidden, rtol=1e-4, atol=1e-2)
    assert not any(m._forward_hooks for m in model)  # hooks removed


def test_input_grams_refuse_unused_and_non_linear_layers() -> None:
    model = _mlp()
    stray = nn.Linear(16, 16)
    with pytest.raises(UserInputError, match="never reached"):
        input_grams(model, {"stray": stray}, _Inputs(), CTX, 1, 2)
    with pytest.raises(UnsupportedModelError, match=r"nn\.Linear"):
        input_grams(model, {"1": model[1]}, _Inputs(), CTX, 1, 2)


def test_stage_with_whiten_needs_data_and_beats_plain_svd_on_the_data() -> None:
    cfg = LowRankConfig(param_ratio=0.4, whiten=True, targets=["0", "2"])
    with pytest.raises(ConfigError, match="--data"):
        METHODS.get("lowrank.svd").apply(_mlp(), cfg, Run(CTX))
    with pytest.raises(ConfigError, match="whiten"):
        lowrank_model(_mlp(), cfg)
    task, reference = _Inputs(), _mlp()
    white, plain = _mlp(), _mlp()
    METHODS.get("lowrank.svd").apply(white, cfg, Run(CTX, task))
    lowrank_model(plain, cfg.model_copy(update={"whiten": False}))
    assert isinstance(white[0], LowRankLinear) and white[0].rank == plain[0].rank == 4
    assert isinstance(white[2], LowRankLinear)
    x = _anisotropic_inputs(500, 16, seed=9).float()  # held-out inputs, same distribution
    first = {n: (m[0](x) - reference[0](x)).norm().item() for n, m in (("w", white), ("p", plain))}
    assert first["w"] < 0.2 * first["p"]  # the layer fed anisotropic inputs: a wide margin
    ref = reference(x)
    assert (white(x) - ref).norm().item() < (plain(x) - ref).norm().item()


def test_energy_rank_reads_the_whitened_spectrum_and_convs_are_refused() -> None:
    layer = _mlp()[0]
    x = _anisotropic_inputs(400, 16).float()
    gram = (x.T @ x).double()
    # inputs live mostly in a few directions, so little whitened rank holds 90% of the energy
    white = factorize(layer, "energy", energy=0.9, gram=gram)
    plain = factorize(layer, "energy", energy=0.9)
    assert isinstance(white, LowRankLinear)
    assert plain is None or white.rank < plain.rank
    with pytest.raises(UnsupportedModelError, match="Linear only"):
        factorize(nn.Conv2d(4, 8, 3), "params", gram=torch.eye(36))


def test_whiten_options_round_trip_and_fail_at_parse_time() -> None:
    from slimtorch.recipe import load_recipe

    body = {"method": "lowrank.svd", "whiten": True, "damp": 0.05, "calibration": {"batches": 2}}
    rec = load_recipe({"stages": [body]})
    assert load_recipe(rec.to_dict()).to_dict() == rec.to_dict()
    cfg = rec.stages[0].config
    assert isinstance(cfg, LowRankConfig) and cfg.calibration.batches == 2 and cfg.damp == 0.05
    for bad in ({"damp": 0}, {"calibration": {"batches": 0}}, {"calibration": {"bogus": 1}}):
        with pytest.raises(ConfigError):
            load_recipe({"stages": [{"method": "lowrank.svd", **bad}]})
