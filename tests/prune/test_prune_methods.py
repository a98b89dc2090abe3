"""The registered prune.* recipe methods on every supported layer type, and their bad inputs."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import pytest
import torch
from pydantic import ValidationError
from torch import nn

import slimtorch.prune  # noqa: F401  (registers the methods)
from slimtorch.core.context import Context
from slimtorch.core.errors import ConfigError, TargetError
from slimtorch.core.methods import METHODS, Run
from slimtorch.formats.state import QuantState, WeightState, get_state, iter_states, set_state
from slimtorch.graph.weights import select_weights
from slimtorch.prune.nm import is_nm_sparse
from slimtorch.testing.tasks import tensor_task


class _Attn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(x, x, x)[0]


class _Rnn(nn.Module):
    def __init__(self, cls: type[nn.Module]) -> None:
        super().__init__()
        self.rnn = cls(8, 8, num_layers=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rnn(x)[0]


Case = tuple[Callable[[], nn.Module], Callable[[], torch.Tensor], int]
CASES: dict[str, Case] = {  # model factory, input factory, number of weight tensors
    "Linear": (
        lambda: nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4)),
        lambda: torch.randn(4, 16),
        2,
    ),
    "Conv1d": (lambda: nn.Conv1d(8, 6, 3), lambda: torch.randn(2, 8, 10), 1),
    "Conv2d": (lambda: nn.Conv2d(8, 4, 3), lambda: torch.randn(2, 8, 6, 6), 1),
    "Embedding": (lambda: nn.Embedding(20, 16), lambda: torch.randint(0, 20, (3, 5)), 1),
    "MultiheadAttention": (_Attn, lambda: torch.randn(5, 2, 16), 2),
    "LSTM": (lambda: _Rnn(nn.LSTM), lambda: torch.randn(5, 2, 8), 4),
    "GRU": (lambda: _Rnn(nn.GRU), lambda: torch.randn(5, 2, 8), 4),
}

STAGES: dict[str, tuple[str, dict[str, Any], float | None]] = {  # method, options, exact sparsity
    "magnitude-layer": ("prune.magnitude", {"sparsity": 0.6}, 0.6),
    "magnitude-global": ("prune.magnitude", {"sparsity": 0.6, "scope": "global"}, 0.6),
    "threshold-std": ("prune.threshold", {"std_k": 0.5}, None),
    "threshold-value": ("prune.threshold", {"value": 0.05}, None),
    "random": ("prune.random", {"rate": 0.4}, None),
    "probabilistic": ("prune.probabilistic", {"sparsity": 0.6, "power": 2.0}, 0.6),
    "nm-2:4": ("prune.nm", {"n": 2, "m": 4}, 0.5),
    "nm-1:4": ("prune.nm", {"n": 1, "m": 4}, 0.75),
}


def _run(model: nn.Module, method: str, seed: int = 0, task: Any = None, **options: Any) -> None:
    spec = METHODS.get(method)
    spec.apply(
        model, spec.config.model_validate(options), Run(Context(seed=seed, progress=False), task)
    )


@pytest.mark.parametrize("stage", list(STAGES))
@pytest.mark.parametrize("layer", list(CASES))
def test_method_on_layer_type(layer: str, stage: str) -> None:
    make_model, make_input, n_weights = CASES[layer]
    method, options, exact = STAGES[stage]
    torch.manual_seed(0)
    model = make_model()
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    _run(model, method, **options)
    states = iter_states(model)
    assert len(states) == n_weights
    total = pruned = 0
    for name, module, param, state in states:
        w = getattr(module, param)
        assert state.mask is not None and state.mask.shape == w.shape
        assert (w[~state.mask] == 0).all()  # masked entries exactly zero
        full = f"{name}.{param}" if name else param
        assert torch.equal(w[state.mask], original[full][state.mask])  # kept entries untouched
        if method == "prune.nm":
            assert is_nm_sparse(w, options["n"], options["m"])
        if exact is not None and options.get("scope") != "global":
            assert int((~state.mask).sum()) == round(exact * w.numel())
        total += w.numel()
        pruned += int((~state.mask).sum())
    if exact is not None and options.get("scope") == "global":
        assert pruned == round(exact * total)
    if method in ("prune.random", "prune.threshold"):
        assert 0 < pruned < total
    with torch.no_grad():
        assert torch.isfinite(model(make_input())).all()


def test_random_and_probabilistic_reproducible_with_seed() -> None:
    for method, opts in [
        ("prune.random", {"rate": 0.5}),
        ("prune.probabilistic", {"sparsity": 0.5}),
    ]:
        masks = []
        for seed in (3, 3, 4):
            torch.manual_seed(0)
            model = nn.Linear(32, 32)
            _run(model, method, seed=seed, **opts)
            masks.append(get_state(model, "weight").mask)
        assert torch.equal(masks[0], masks[1]) and not torch.equal(masks[0], masks[2])


def test_masks_combine_and_sparsity_only_grows() -> None:
    torch.manual_seed(0)
    model = nn.Linear(16, 16)
    _run(model, "prune.random", rate=0.3)
    first = get_state(model, "weight").mask.clone()
    _run(model, "prune.magnitude", sparsity=0.5)
    second = get_state(model, "weight").mask
    assert not (second & ~first).any()  # nothing comes back
    assert int((~second).sum()) == 128  # exact, since the old zeros rank first
    _run(model, "prune.nm", n=2, m=4)
    third = get_state(model, "weight").mask
    assert not (third & ~second).any() and is_nm_sparse(model.weight, 2, 4)
    assert (model.weight[~third] == 0).all()


def test_extra_state_survives_pruning() -> None:
    model = nn.Linear(8, 8)
    set_state(model, "weight", WeightState(mask=torch.ones(8, 8, dtype=torch.bool), extra={"k": 1}))
    _run(model, "prune.magnitude", sparsity=0.25)
    state = get_state(model, "weight")
    assert state.extra == {"k": 1} and int((~state.mask).sum()) == 16


def test_prune_after_quantize_is_refused_before_touching_weights() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    before = model[0].weight.detach().clone()
    q = QuantState(
        "affine",
        8,
        True,
        "per_tensor",
        torch.zeros(4, 4, dtype=torch.int8),
        torch.ones(1, 1),
        torch.zeros(1, 1, dtype=torch.int32),
    )
    set_state(model[1], "weight", WeightState(quant=q))
    for method, opts in [
        ("prune.magnitude", {"sparsity": 0.5}),
        ("prune.nm", {}),
        ("prune.magnitude", {"sparsity": 0.5, "scope": "global"}),
    ]:
        with pytest.raises(
            ConfigError, match=r"prune before quantizing.*move the prune stage earlier"
        ):
            _run(model, method, **opts)
    assert torch.equal(model[0].weight, before) and get_state(model[0], "weight") is None


@pytest.mark.parametrize(
    ("method", "options", "match"),
    [
        ("prune.magnitude", {"sparsity": 1.0}, "less than 1"),
        ("prune.magnitude", {"sparsity": -0.1}, "greater than or equal to 0"),
        ("prune.magnitude", {"sparsity": 0.5, "scope": "model"}, "scope"),
        ("prune.magnitude", {"sparsity": 0.5, "sparsty": 0.5}, "sparsty"),
        ("prune.random", {"rate": 1.0}, "rate"),
        ("prune.probabilistic", {"power": -1}, "power"),
        ("prune.threshold", {}, "exactly one of `value`.*`std_k`"),
        ("prune.threshold", {"value": 0.1, "std_k": 1.0}, "exactly one of `value`.*`std_k`"),
        ("prune.nm", {"n": 4, "m": 4}, "`n` must be smaller than `m`"),
        ("prune.nm", {"n": 5, "m": 4}, "`n` must be smaller than `m`"),
        ("prune.gradual", {"initial_sparsity": 0.5, "final_sparsity": 0.2}, "must not exceed"),
        (
            "prune.gradual",
            {"n": 10, "frequency": 10, "train": {"steps": 100}},
            "train.steps >= 101",
        ),
    ],
)
def test_bad_options_fail_at_parse_time(method: str, options: dict[str, Any], match: str) -> None:
    with pytest.raises(ValidationError, match=match):
        METHODS.get(method).config.model_validate(options)


def test_targets_matching_nothing() -> None:
    with pytest.raises(TargetError, match=r"no module matched.*Conv2d"):
        _run(nn.Sequential(nn.Linear(4, 4)), "prune.magnitude", targets=["Conv2d"])


def test_targets_and_ignore_select_layers() -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 2))
    _run(model, "prune.magnitude", sparsity=0.5, targets=["Linear"], ignore=["2"])
    assert get_state(model[0], "weight") is not None and get_state(model[2], "weight") is None


def test_nm_conv_not_divisible_names_layer() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3))
    with pytest.raises(ConfigError, match=r"'0'.*input size 3.*`ignore`"):
        _run(model, "prune.nm")
    _run(model, "prune.nm", ignore=["0"])
    assert is_nm_sparse(model[1].weight, 2, 4)


def test_logs_achieved_sparsity(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="slimtorch.prune"):
        _run(nn.Linear(10, 10), "prune.magnitude", sparsity=0.3)
    assert "prune.magnitude: sparsity 0.3000 over 100 weights in 1 tensors" in caplog.text


def _classify(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Is x0 + x1 > 0?"""
    x = torch.randn(n, 8, generator=torch.Generator().manual_seed(seed))
    return x, (x[:, 0] + x[:, 1] > 0).long()


def test_gradual_method_reaches_final_sparsity_with_zeros() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 2))
    options = {
        "final_sparsity": 0.8,
        "start_step": 2,
        "frequency": 4,
        "n": 5,
        "scope": "global",
        "train": {"steps": 40, "lr": 0.01, "batch_size": 32, "lr_schedule": "constant"},
    }
    _run(
        model,
        "prune.gradual",
        task=tensor_task(*_classify(2048, 7), name="tiny-classification"),
        **options,
    )
    refs = select_weights(model)
    masks = [get_state(r.module, r.param).mask for r in refs]
    assert sum(int((~m).sum()) for m in masks) == round(0.8 * sum(m.numel() for m in masks))
    for r, m in zip(refs, masks):
        assert (r.weight[~m] == 0).all()
    x, y = _classify(256, 1)
    with torch.no_grad():
        acc = float((model(x).argmax(1) == y).float().mean())
    assert acc > 0.8  # still learns the task at 80% sparsity


def test_gradual_needs_data() -> None:
    with pytest.raises(ConfigError, match="--data"):
        _run(nn.Linear(4, 4), "prune.gradual")
    assert METHODS.get("prune.gradual").needs_data
    assert not METHODS.get("prune.magnitude").needs_data
