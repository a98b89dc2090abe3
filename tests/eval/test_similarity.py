"""Evaluator lee: Pearson/Spearman of MiniLM cosine similarities against human judgements."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("transformers")

from slimtorch.core.context import Context
from slimtorch.core.errors import UserInputError
from slimtorch.eval import similarity
from slimtorch.eval.quality import EVALUATORS
from slimtorch.zoo import minilm


@pytest.fixture(scope="module")
def model() -> nn.Module:
    return minilm.build(True)


def test_pearson_and_spearman() -> None:
    x = np.array([1.0, 2.0, 3.0, 4.0])
    assert similarity.pearson(x, 2 * x + 1) == pytest.approx(1.0)
    assert similarity.pearson(x, -x) == pytest.approx(-1.0)
    assert similarity.pearson(x, np.ones(4)) == 0.0
    assert similarity.spearman(x, x**3) == pytest.approx(1.0)
    assert similarity.pearson(
        np.array([1.0, 2.0, 3.0]), np.array([1.0, 3.0, 2.0])
    ) == pytest.approx(0.5)


def test_average_ranks_share_ties() -> None:
    ranks = similarity.average_ranks(np.array([10.0, 20.0, 20.0, 5.0, 20.0]))
    assert ranks.tolist() == [2.0, 4.0, 4.0, 1.0, 4.0]


def test_pair_scores_upper_triangle() -> None:
    emb = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    human = np.array([[1.0, 0.1, 0.2], [0.0, 1.0, 0.3], [0.0, 0.0, 1.0]])
    sims, scores = similarity.pair_scores(emb, human)
    assert scores.tolist() == [0.1, 0.2, 0.3]
    assert np.allclose(sims, [0.0, 2**-0.5, 2**-0.5])


def test_fp32_minilm_matches_published(model: nn.Module) -> None:
    q = EVALUATORS.get("lee")(model, Context(progress=False), "builtin:lee")
    assert q.metric == "lee_pearson" and q.higher_is_better
    assert q.value == pytest.approx(0.656, abs=0.01)
    assert q.extra["lee_spearman"] == pytest.approx(0.508, abs=0.01)
    assert q.extra["embedding_cosine"] == pytest.approx(1.0, abs=1e-5)


def test_damaged_model_scores_lower(model: nn.Module) -> None:
    q = similarity.evaluate_lee(minilm.build(False), Context(progress=False), None)
    assert q.value < 0.4
    assert q.extra["embedding_cosine"] < 0.5


def test_bad_inputs(model: nn.Module) -> None:
    with pytest.raises(UserInputError, match="builtin:lee"):
        similarity.evaluate_lee(model, Context(), "builtin:austen")
    with pytest.raises(UserInputError, match="50 Lee documents"):
        similarity.lee_quality(torch.randn(10, 384), np.zeros((50, 50)))
