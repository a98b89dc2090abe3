"""Builtin minilm: all-MiniLM-L6-v2 as a BertModel, its tokenizer and sentence embeddings."""

from __future__ import annotations

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")

from slimtorch.core.errors import UserInputError
from slimtorch.models.registry import MODELS
from slimtorch.zoo import minilm

SENTENCES = [
    "A man is playing a guitar.",
    "Someone plays an instrument.",
    "The stock market fell sharply today.",
]


@pytest.fixture(scope="module")
def model() -> nn.Module:
    return minilm.build(True)


def test_registered() -> None:
    info = MODELS.get("minilm")
    assert (info.evaluator, info.data, info.task) == ("lee", "builtin:lee", "sentences")


def test_untrained_build_has_same_shapes(model: nn.Module) -> None:
    fresh = minilm.build(False)
    a, b = model.state_dict(), fresh.state_dict()
    assert a.keys() == b.keys()
    assert all(a[k].shape == b[k].shape for k in a)
    key = "encoder.layer.0.attention.self.query.weight"
    assert not torch.equal(a[key], b[key])


def test_example_inputs_run(model: nn.Module) -> None:
    ids, mask = minilm.example_inputs(3)
    assert ids.shape == mask.shape == (3, 128) and ids.dtype == torch.int64
    assert bool((ids[:, 0] == 101).all())  # [CLS]
    with torch.no_grad():
        out = model(ids, mask)
    assert out.last_hidden_state.shape == (3, 128, 384)


def test_tokenize_truncates_and_pads() -> None:
    ids, mask = minilm.tokenize(["word " * 400, "short"], max_len=16)
    assert ids.shape == (2, 16)
    assert ids[0, 0] == 101 and ids[0, -1] == 102  # [CLS] ... [SEP] kept
    assert mask[1].tolist() == [1, 1, 1] + [0] * 13 and ids[1, 3:].eq(0).all()
    ids, mask = minilm.tokenize(["short"], pad_to=8)
    assert ids.shape == (1, 8) and int(mask.sum()) == 3
    with pytest.raises(UserInputError, match="at least one"):
        minilm.tokenize([])


def test_embed_unit_norm_and_batch_invariant(model: nn.Module) -> None:
    emb = minilm.embed(model, SENTENCES)
    assert emb.shape == (3, 384)
    assert torch.allclose(emb.norm(dim=1), torch.ones(3), atol=1e-5)
    one_by_one = minilm.embed(model, SENTENCES, batch_size=1)
    assert torch.allclose(emb, one_by_one, atol=1e-5)
    sims = emb @ emb.T
    assert sims[0, 1] > sims[0, 2] + 0.2  # paraphrase closer than unrelated
    with pytest.raises(UserInputError, match="batch_size"):
        minilm.embed(model, SENTENCES, batch_size=0)
    assert model.training is False
