"""Evaluator bpc: bits per character on held-out text."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from slimtorch.core.context import Context
from slimtorch.core.errors import UserInputError
from slimtorch.eval import language
from slimtorch.eval.quality import EVALUATORS
from slimtorch.zoo import char_lstm


@pytest.fixture(scope="module")
def model() -> nn.Module:
    return char_lstm.build(True)


def test_sample_positions_even_and_deterministic() -> None:
    cand = torch.arange(100, 200)
    assert language.sample_positions(cand, 5).tolist() == [100, 125, 150, 174, 199]
    assert torch.equal(language.sample_positions(cand, 1000), cand)


def test_nll_bits_uniform() -> None:
    logits = torch.zeros(4, 465)
    bits = language.nll_bits(logits, torch.tensor([1, 2, 3, 4]))
    assert float(bits) == pytest.approx(4 * math.log2(465))


def test_evaluator_on_austen(model: nn.Module, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(language, "SAMPLE", 2_000)
    q = EVALUATORS.get("bpc")(model, Context(progress=False), None)
    assert q.metric == "bits_per_char" and q.higher_is_better is False
    assert q.extra["positions"] == 2_000
    assert 2.2 < q.value < 3.2
    random = language.evaluate_bpc(
        char_lstm.build(False), Context(progress=False), "builtin:austen"
    )
    assert random.value == pytest.approx(math.log2(465), abs=0.3)


@pytest.mark.slow
def test_evaluator_full_sample(model: nn.Module) -> None:
    q = language.evaluate_bpc(model, Context(progress=False), None)
    assert q.extra["positions"] == language.SAMPLE
    assert 2.3 < q.value < 2.7


def test_text_file_and_empty_targets(model: nn.Module, tmp_path: Path) -> None:
    path = tmp_path / "t.txt"
    path.write_text("It is a truth universally acknowledged. " * 50, encoding="utf-8")
    q = language.evaluate_bpc(model, Context(progress=False), str(path))
    assert 0.0 < q.value < 3.2  # repetitive English is easy
    with pytest.raises(UserInputError, match="no characters"):
        language.bits_per_char(model, torch.tensor([1, 2]), torch.tensor([], dtype=torch.int64))
