"""eval.quality: one evaluator registry, the samples/split protocol, evenly spaced subsamples."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from slimtorch.core.context import Context
from slimtorch.core.errors import ConfigError, UserInputError
from slimtorch.eval.quality import (
    EVALUATORS,
    Evaluator,
    Measure,
    Quality,
    Split,
    get_evaluator,
    spaced,
)

CTX = Context(progress=False)
DATA = {"calibration": [1.0, 2.0, 3.0, 4.0, 5.0], "evaluation": [10.0, 20.0, 30.0]}


def _prepare(
    model: nn.Module, ctx: Context, data: Any, samples: int | None, split: Split
) -> Measure:
    """A throw-away evaluator: the mean of the chosen items times the model's scale."""
    items = torch.tensor(DATA[split])
    if samples is not None:
        items = items[spaced(len(items), samples)]
    loads.append((data, samples, split))

    def measure(m: nn.Module) -> Quality:
        value = float(items.mean()) * m.scale
        return Quality("toy_mean", value, higher_is_better=False, extra={"n": float(len(items))})

    return measure


loads: list[tuple[Any, int | None, str]] = []


class Scaled(nn.Module):
    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = scale


@pytest.fixture
def toy(monkeypatch: pytest.MonkeyPatch) -> Evaluator:
    evaluator = Evaluator("toy_mean", False, _prepare, scan_samples=2)
    monkeypatch.setitem(EVALUATORS._items, "toy", evaluator)
    loads.clear()
    return evaluator


def test_registered_evaluator_is_found_and_runs_whole_by_default(toy: Evaluator) -> None:
    assert "toy" in EVALUATORS and get_evaluator("toy") is toy
    q = get_evaluator("toy")(Scaled(1.0), CTX, "d")  # the call api.evaluate makes
    assert (q.metric, q.value, q.higher_is_better, q.extra) == ("toy_mean", 20.0, False, {"n": 3})
    assert loads == [("d", None, "evaluation")]


def test_samples_and_split_choose_evenly_spaced_items(toy: Evaluator) -> None:
    q = toy(Scaled(1.0), CTX, None, samples=3, split="calibration")
    assert q.value == pytest.approx(3.0) and q.extra["n"] == 3  # items 1, 3, 5
    assert toy(Scaled(1.0), CTX, None, samples=2).value == pytest.approx(20.0)  # 10 and 30


def test_bind_loads_once_and_measures_any_model(toy: Evaluator) -> None:
    measure = toy.bind(Scaled(1.0), CTX, "d", samples=2, split="calibration")
    assert [measure(Scaled(s)).value for s in (1.0, 2.0)] == [3.0, 6.0]
    assert loads == [("d", 2, "calibration")]


def test_bad_requests_fail_before_loading(toy: Evaluator) -> None:
    with pytest.raises(UserInputError, match="split must be 'calibration' or 'evaluation'"):
        toy(Scaled(1.0), CTX, None, split="test")  # type: ignore[arg-type]
    with pytest.raises(UserInputError, match="samples must be at least 1"):
        toy(Scaled(1.0), CTX, None, samples=0)
    assert loads == []


def test_unknown_evaluator_lists_the_known_ones(toy: Evaluator) -> None:
    with pytest.raises(ConfigError) as err:
        get_evaluator("accuracyy")
    msg = str(err.value)
    assert "did you mean 'accuracy'?" in msg
    for name in ("accuracy", "bpc", "lee", "perplexity", "toy"):  # the zoo's, found by plugin
        assert name in msg.split("Known evaluators:")[1]


def test_a_name_registers_once() -> None:
    with pytest.raises(ValueError, match="already registered"):
        EVALUATORS.add("accuracy", EVALUATORS.get("accuracy"))


def test_spaced() -> None:
    assert spaced(10, 4).tolist() == [0, 3, 6, 9]
    assert spaced(3, 5).tolist() == [0, 1, 2]
    assert spaced(7, 1).tolist() == [0]
    with pytest.raises(UserInputError, match="empty"):
        spaced(0, 3)
    with pytest.raises(UserInputError, match="at least 1"):
        spaced(5, 0)
