"""eval.similarity: Pearson, Spearman, pair scores and mean cosine."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from slimtorch.eval import similarity


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


def test_mean_cosine() -> None:
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    b = torch.tensor([[2.0, 0.0], [1.0, 0.0]])
    assert similarity.mean_cosine(a, b) == pytest.approx(0.5)
