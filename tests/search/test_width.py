"""choose_width: the widest width of a reordered model within a budget."""

from __future__ import annotations

import pytest
import torch

import slimtorch as st
from slimtorch.core.errors import UserInputError
from slimtorch.core.info import update_info
from slimtorch.search.width import choose_width
from slimtorch.testing.models import example_input, tiny_resnet


def _ordered() -> torch.nn.Module:
    model = tiny_resnet()
    update_info(model, input={"shape": [4, 1, 8, 8], "dtype": "float32"})
    return st.compress(model, {"stages": [{"method": "prune.reorder"}]}).model


def test_params_budget_picks_the_widest_that_fits() -> None:
    model = _ordered()
    full = sum(p.numel() for p in model.parameters())
    choice = choose_width(model, (example_input(model),), max_params=full // 2)
    assert choice.width < 1.0
    assert sum(p.numel() for p in choice.model.parameters()) <= full // 2
    assert choice.measured[0]["width"] == 1.0
    generous = choose_width(model, (example_input(model),), max_latency_ms=1e6, repeats=2)
    assert generous.width == 1.0 and "latency_ms" in generous.measured[0]


def test_impossible_budget_is_an_error() -> None:
    model = _ordered()
    with pytest.raises(UserInputError, match="no width"):
        choose_width(model, (example_input(model),), max_params=10)
    with pytest.raises(UserInputError, match="budget"):
        choose_width(model, (example_input(model),))
