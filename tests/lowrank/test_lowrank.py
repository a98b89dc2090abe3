"""Truncated SVD, rank selection and the lowrank.svd stage."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from pydantic import ValidationError
from torch import nn

import slimtorch.api as api
from slimtorch.core.context import Context
from slimtorch.core.errors import ConfigError, TargetError, UnsupportedModelError
from slimtorch.core.methods import METHODS, Run
from slimtorch.graph.weights import select_weights
from slimtorch.lowrank import (
    LowRankConfig,
    choose_rank,
    energy_rank,
    factorize,
    lowrank_model,
    params_rank,
    reduces_params,
    singular_values,
    truncated_svd,
)
from slimtorch.runtime import RUNTIME_MODULES
from slimtorch.runtime.lowrank import LowRankConv2d, LowRankLinear
from slimtorch.testing.models import example_input, tiny_cnn, tiny_lstm, tiny_transformer
from slimtorch.testing.tasks import TensorTask, tensor_task

for _cls in (LowRankLinear, LowRankConv2d):  # until slimtorch.runtime registers them itself
    if _cls.__name__ not in RUNTIME_MODULES:
        RUNTIME_MODULES.add(_cls.__name__, _cls)


def _with_spectrum(s: list[float], rows: int = 12, cols: int = 9) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(rows, len(s), generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(cols, len(s), generator=g, dtype=torch.float64))
    return (u * torch.tensor(s, dtype=torch.float64)) @ v.T


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_full_rank_reproduces_the_weight() -> None:
    w = torch.randn(7, 5, generator=torch.Generator().manual_seed(1))
    a, b = truncated_svd(w, 5)
    assert a.shape == (7, 5) and b.shape == (5, 5) and a.dtype == torch.float32
    assert (a @ b - w).abs().max().item() < 1e-5


def test_truncation_error_is_the_tail_energy_and_split_is_balanced() -> None:
    w = _with_spectrum([5.0, 3.0, 1.0, 0.5]).float()
    a, b = truncated_svd(w, 2)
    err = torch.linalg.matrix_norm(w - a @ b).item()  # Frobenius: Eckart-Young
    assert err == pytest.approx((1.0 + 0.25) ** 0.5, rel=1e-5)
    torch.testing.assert_close(a.norm(dim=0), b.norm(dim=1))  # sqrt(sigma) on both sides


def test_energy_threshold_picks_the_rank_of_a_known_spectrum() -> None:
    w = _with_spectrum([4.0, 2.0, 1.0, 0.5])  # sigma^2 = 16, 4, 1, 0.25 of 21.25
    torch.testing.assert_close(singular_values(w)[:4], torch.tensor([4.0, 2.0, 1.0, 0.5]).double())
    expected = {0.5: 1, 16 / 21.25: 1, 0.76: 2, 0.9: 2, 0.95: 3, 0.99: 4, 1.0: 4}
    for energy, rank in expected.items():
        assert energy_rank(singular_values(w), energy) == rank, energy
        assert choose_rank(w, "energy", energy=energy) == rank
    assert energy_rank(torch.zeros(3), 0.9) == 1


def test_params_rank_and_reduction() -> None:
    assert params_rank(384, 1536, 0.5) == 153  # floor(0.5 * 384 * 1536 / 1920)
    assert reduces_params(384, 1536, 153) and not reduces_params(384, 1536, 308)
    assert choose_rank(torch.zeros(4, 6), "params", param_ratio=0.9) == 2


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: energy_rank(torch.ones(3), 0.0), "energy must be in"),
        (lambda: energy_rank(torch.ones(3), 1.5), "energy must be in"),
        (lambda: params_rank(4, 4, 1.0), "param_ratio must be in"),
        (lambda: truncated_svd(torch.ones(3, 4), 4), "rank must be in 1..3"),
        (lambda: choose_rank(torch.ones(3, 4), "bits"), "rank_by must be"),  # type: ignore[arg-type]
    ],
)
def test_bad_rank_options_raise_config_error(call: Any, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        call()


@pytest.mark.parametrize(
    "cfg", [{"energy": 0.0}, {"energy": 1.01}, {"param_ratio": 1.0}, {"param_ratio": 0}]
)
def test_out_of_range_config_fails_at_parse_time(cfg: dict[str, float]) -> None:
    with pytest.raises(ValidationError):
        LowRankConfig(**cfg)


def test_unsupported_layers_are_refused_clearly() -> None:
    with pytest.raises(UnsupportedModelError, match=r"nn\.Linear and nn\.Conv2d, not Conv1d"):
        factorize(nn.Conv1d(4, 4, 3), "params")
    with pytest.raises(UnsupportedModelError, match="NaN"):
        truncated_svd(torch.tensor([[float("nan"), 1.0]]), 1)
    with pytest.raises(TargetError, match="supported layer types: Linear, Conv2d"):
        lowrank_model(tiny_lstm(), LowRankConfig(targets=["LSTM"]))


def test_factorized_linear_matches_and_halves_parameters() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(64, 48)
    low = factorize(lin, "params", param_ratio=0.5)
    assert isinstance(low, LowRankLinear) and low.rank == 13  # floor(.5*64*48/112)
    assert _n_params(low) - 48 <= 0.5 * 64 * 48
    x = torch.randn(5, 64)
    a, b = truncated_svd(lin.weight.detach(), 13)
    torch.testing.assert_close(low(x), x @ (a @ b).T + lin.bias, atol=1e-5, rtol=0)
    assert factorize(nn.Linear(4, 4), "energy", energy=1.0) is None  # no reducing rank


def test_factorized_conv_is_exact_at_full_rank_and_close_when_truncated() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 16, 3, stride=2, padding=1)
    w = conv.weight.detach().reshape(16, -1)  # [16, 27]: full rank 16
    a, b = truncated_svd(w, 16)
    low = LowRankConv2d.from_conv(conv, a, b)
    x = torch.randn(2, 3, 9, 9)
    assert (low(x) - conv(x)).abs().max().item() < 1e-5
    small = factorize(conv, "energy", energy=0.5)
    assert isinstance(small, LowRankConv2d) and small.rank == 4
    assert _n_params(small) < _n_params(conv)
    assert factorize(nn.Conv2d(4, 4, 3, groups=2), "params") is None  # grouped: skipped


def test_stage_on_models_skips_attention_and_keeps_factors_compressible() -> None:
    model = tiny_transformer()
    before = _n_params(model)
    spec = METHODS.get("lowrank.svd")
    spec.apply(model, LowRankConfig(param_ratio=0.5), Run(Context(progress=False)))
    assert isinstance(model.ff[0], LowRankLinear) and isinstance(model.head, LowRankLinear)
    assert type(model.attn.out_proj) is not LowRankLinear  # MHA reads out_proj.weight itself
    assert _n_params(model) < before
    names = {r.name for r in select_weights(model, types=("Linear",))}
    assert {"ff.0.down.weight", "ff.0.up.weight", "head.down.weight"} <= names
    ranks = lowrank_model(model, LowRankConfig())  # again: factors are not re-factored
    assert ranks == {}


def test_compose_with_pruning_and_round_trip(tmp_path) -> None:
    model = tiny_cnn()
    api.set_architecture(model, {"kind": "factory", "ref": "slimtorch.testing.models:tiny_cnn"})
    recipe = {
        "stages": [
            {"method": "lowrank.svd", "param_ratio": 0.5, "targets": ["Linear"]},
            {"method": "prune.magnitude", "sparsity": 0.5},
        ]
    }
    result = api.compress(model, recipe)
    fc1 = result.model.fc1
    assert isinstance(fc1, LowRankLinear) and fc1.rank == 12  # floor(.5*128*32/160)
    assert result.model.fc2.rank == 1  # floor(.5*32*4/36): 36 < 128 parameters
    assert (fc1.down.weight == 0).float().mean().item() == pytest.approx(0.5, abs=0.02)
    api.save(result.model, tmp_path / "art")
    loaded = api.load(tmp_path / "art", trust_factory=True)
    x = example_input(model)
    assert isinstance(loaded.fc1, LowRankLinear) and loaded.fc1.rank == fc1.rank
    assert torch.equal(loaded(x), result.model(x))


def _regression(teacher: nn.Module) -> TensorTask:
    """A tiny Task: fit the outputs of a fixed copy of the model."""
    x = torch.randn(1024, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return tensor_task(x, teacher(x), loss="mse", name="regression")


def test_finetune_needs_data_and_trains_the_factors() -> None:
    cfg = LowRankConfig(param_ratio=0.3, targets=["fc1"], finetune={"steps": 30, "lr": 1e-3})
    spec = METHODS.get("lowrank.svd")
    with pytest.raises(ConfigError, match="--data"):
        spec.apply(tiny_cnn(), cfg, Run(Context(progress=False)))
    teacher, model = tiny_cnn(), tiny_cnn()
    task = _regression(teacher)
    x = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    lowrank_model(probe := tiny_cnn(), cfg)
    err_before = nn.functional.mse_loss(probe(x), teacher(x)).item()
    spec.apply(model, cfg, Run(Context(progress=False), task))
    assert isinstance(model.fc1, LowRankLinear)
    err_after = nn.functional.mse_loss(model(x), teacher(x)).item()
    assert err_after < 0.7 * err_before


def test_stage_config_round_trips_through_a_recipe() -> None:
    from slimtorch.recipe import load_recipe

    body = {"method": "lowrank.svd", "rank_by": "energy", "energy": 0.8, "finetune": {"steps": 5}}
    rec = load_recipe({"stages": [body]})
    again = load_recipe(rec.to_dict())
    assert again.to_dict() == rec.to_dict()
    cfg = again.stages[0].config
    assert isinstance(cfg, LowRankConfig) and cfg.finetune is not None and cfg.finetune.steps == 5
    with pytest.raises(ConfigError):
        load_recipe({"stages": [{"method": "lowrank.svd", "param_ratio": 1.5}]})
