"""The bundled evaluators: accuracy, bpc, lee and perplexity, whole and subsampled."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from slimtorch.core.context import Context
from slimtorch.core.errors import UserInputError
from slimtorch.eval.quality import EVALUATORS, get_evaluator
from slimtorch.zoo import austen_lm, char_lstm, evaluators
from slimtorch.zoo.austen_lm import from_config, llama_config
from slimtorch.zoo.data_images import to_model_input
from slimtorch.zoo.evaluators import evaluate_accuracy, image_accuracy
from slimtorch.zoo.train_austen_lm import train_tokenizer

CTX = Context(progress=False)

# accuracy ----------------------------------------------------------------------------------


class MeanThreshold(nn.Module):
    """Predicts class 1 when the mean normalised pixel is above 0, else class 0."""

    def __init__(self) -> None:
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.shape[1:] == (1, 28, 28) and x.dtype == torch.float32
        assert not self.training
        m = x.mean(dim=(1, 2, 3))
        return torch.stack([-m, m], dim=1) + self.dummy


def _data():
    images = torch.zeros(10, 28, 28, dtype=torch.uint8)
    images[:4] = 255  # bright -> predicted 1
    labels = torch.tensor([1, 1, 1, 0, 0, 0, 0, 0, 1, 1])
    return images, labels  # correct: 3 bright labelled 1 + 4 dark labelled 0 -> 7 of 10


@pytest.mark.parametrize("batch_size", [1, 3, 1000])
def test_accuracy_exact_and_batch_independent(batch_size):
    model = MeanThreshold().train()
    assert image_accuracy(model, *_data(), batch_size=batch_size) == pytest.approx(70.0)
    assert model.training  # mode restored


def test_accuracy_bad_inputs():
    images, labels = _data()
    with pytest.raises(UserInputError, match="one per image"):
        image_accuracy(MeanThreshold(), images, labels[:5])
    with pytest.raises(UserInputError, match="empty"):
        image_accuracy(MeanThreshold(), images[:0], labels[:0])
    with pytest.raises(UserInputError, match="batch_size"):
        image_accuracy(MeanThreshold(), images, labels, batch_size=0)


def test_evaluator_registered_and_reads_npz(tmp_path):
    images, labels = _data()
    path = tmp_path / "d.npz"
    np.savez(path, images=images.numpy(), labels=labels.numpy())
    evaluator = EVALUATORS.get("accuracy")
    assert evaluator is evaluate_accuracy
    q = evaluator(MeanThreshold(), CTX, str(path))
    assert (q.metric, q.higher_is_better) == ("accuracy", True)
    assert q.value == pytest.approx(70.0) and q.extra["images"] == 10.0


def test_evaluator_default_is_fashion_test_split():
    class Constant(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.one_hot(torch.full((len(x),), 3), 10).float()

    q = evaluate_accuracy(Constant(), CTX, None)
    # Fashion-MNIST is balanced: a constant guess is right on one image in ten
    assert q.value == pytest.approx(10.0, abs=1.0)
    assert q.extra["images"] in (2000.0, 10000.0)


def test_to_model_input_used_for_evaluation():
    images, _ = _data()
    x = to_model_input(images)
    assert float(x[0].mean()) > 0 > float(x[-1].mean())


def test_accuracy_samples_and_split(tmp_path):
    images, labels = _data()
    path = tmp_path / "d.npz"
    np.savez(path, test_images=images.numpy(), test_labels=labels.numpy())
    # evenly spaced 4 of 10: items 0, 3, 6, 9 (labels 1, 0, 0, 1; bright 0, 3): 2 of 4 right
    q = evaluate_accuracy(MeanThreshold(), CTX, str(path), samples=4)
    assert q.value == pytest.approx(50.0) and q.extra["images"] == 4.0
    # no train split: calibration falls back to the test split, and says so
    with pytest.warns(UserWarning, match="no training images"):
        q = evaluate_accuracy(MeanThreshold(), CTX, str(path), split="calibration")
    assert q.value == pytest.approx(70.0)
    both = tmp_path / "both.npz"
    arrays = {"test_images": images.numpy(), "test_labels": labels.numpy()}
    np.savez(both, train_images=images.numpy(), train_labels=(1 - labels).numpy(), **arrays)
    q = evaluate_accuracy(MeanThreshold(), CTX, str(both), split="calibration")
    assert q.value == pytest.approx(30.0)  # the train split, whose labels are flipped
    with pytest.raises(UserInputError, match="at least 1"):
        evaluate_accuracy(MeanThreshold(), CTX, str(path), samples=0)
    with pytest.raises(UserInputError, match="split must be"):
        evaluate_accuracy(MeanThreshold(), CTX, str(path), split="test")  # type: ignore[arg-type]


# bpc ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def char_model() -> nn.Module:
    return char_lstm.build(True)


def test_bpc_evaluator_on_austen(char_model: nn.Module, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(evaluators, "SAMPLE", 2_000)
    q = EVALUATORS.get("bpc")(char_model, CTX, None)
    assert q.metric == "bits_per_char" and q.higher_is_better is False
    assert q.extra["positions"] == 2_000
    assert 2.2 < q.value < 3.2
    random = evaluators.evaluate_bpc(char_lstm.build(False), CTX, "builtin:austen")
    assert random.value == pytest.approx(math.log2(465), abs=0.3)


@pytest.mark.slow
def test_bpc_evaluator_full_sample(char_model: nn.Module) -> None:
    q = evaluators.evaluate_bpc(char_model, CTX, None)
    assert q.extra["positions"] == evaluators.SAMPLE
    assert 2.3 < q.value < 2.7


def test_bpc_text_file_and_empty_targets(char_model: nn.Module, tmp_path: Path) -> None:
    path = tmp_path / "t.txt"
    path.write_text("It is a truth universally acknowledged. " * 50, encoding="utf-8")
    q = evaluators.evaluate_bpc(char_model, CTX, str(path))
    assert 0.0 < q.value < 3.2  # repetitive English is easy
    with pytest.raises(UserInputError, match="no characters"):
        evaluators.char_lstm_bpc(
            char_model, torch.tensor([1, 2]), torch.tensor([], dtype=torch.int64)
        )


def test_bpc_samples_score_the_chosen_split(char_model: nn.Module, tmp_path: Path) -> None:
    path = tmp_path / "t.txt"
    path.write_text("abcdefghij " * 300 + "The end of the text is here. " * 40, encoding="utf-8")
    train = evaluators.evaluate_bpc(char_model, CTX, str(path), samples=300, split="calibration")
    held = evaluators.evaluate_bpc(char_model, CTX, str(path), samples=300)
    assert train.extra["positions"] == held.extra["positions"] == 300
    assert train.value != held.value  # different text: the first 90% and the last 10%


# lee ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm_model() -> nn.Module:
    pytest.importorskip("transformers")
    from slimtorch.zoo import minilm

    return minilm.build(True)


def test_fp32_minilm_matches_published(minilm_model: nn.Module) -> None:
    q = EVALUATORS.get("lee")(minilm_model, CTX, "builtin:lee")
    assert q.metric == "lee_pearson" and q.higher_is_better
    assert q.value == pytest.approx(0.656, abs=0.01)
    assert q.extra["lee_spearman"] == pytest.approx(0.508, abs=0.01)
    assert q.extra["embedding_cosine"] == pytest.approx(1.0, abs=1e-5)


def test_damaged_model_scores_lower(minilm_model: nn.Module) -> None:
    from slimtorch.zoo import minilm

    q = evaluators.evaluate_lee(minilm.build(False), CTX, None)
    assert q.value < 0.4
    assert q.extra["embedding_cosine"] < 0.5


def test_lee_samples_are_evenly_spaced_documents(minilm_model: nn.Module) -> None:
    from slimtorch.eval.similarity import pair_scores, pearson
    from slimtorch.zoo import data_text, minilm

    q = evaluators.evaluate_lee(minilm_model, CTX, None, samples=4)
    docs, human = data_text.load_lee()
    idx = [0, 16, 33, 49]
    sims, scores = pair_scores(
        minilm.embed(minilm_model, [docs[i] for i in idx]), human[np.ix_(idx, idx)]
    )
    assert q.value == pytest.approx(pearson(sims, scores), abs=1e-12)
    assert q.extra["documents"] == 4 and "embedding_cosine" not in q.extra


def test_lee_bad_inputs(minilm_model: nn.Module) -> None:
    with pytest.raises(UserInputError, match="builtin:lee"):
        evaluators.evaluate_lee(minilm_model, Context(), "builtin:austen")
    with pytest.raises(UserInputError, match="50 Lee documents"):
        evaluators.lee_quality(torch.randn(10, 384), np.zeros((50, 50)))
    with pytest.raises(UserInputError, match="at least 3 documents"):
        evaluators.evaluate_lee(minilm_model, CTX, None, samples=2)


# perplexity --------------------------------------------------------------------------------

VOCAB = 300
CONTEXT = 32


def tiny_llama(vocab: int = VOCAB) -> nn.Module:
    torch.manual_seed(0)
    cfg = llama_config(
        vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=CONTEXT,
    )
    return from_config(cfg)


@pytest.fixture
def hf_dir(tmp_path: Path) -> Path:
    words = [
        "the",
        "of",
        "and",
        "to",
        "a",
        "in",
        "was",
        "her",
        "it",
        "she",
        "he",
        "that",
        "not",
        "be",
        "as",
        "had",
        "for",
        "with",
        "his",
        "you",
    ]
    gen = torch.Generator().manual_seed(0)
    text = " ".join(words[int(i)] for i in torch.randint(0, len(words), (3000,), generator=gen))
    tok = train_tokenizer([text], VOCAB)
    (tmp_path / "tokenizer.json").write_text(tok.to_str())
    (tmp_path / "text.txt").write_text(text)
    return tmp_path


def test_perplexity_evaluator_uses_the_models_tokenizer(hf_dir: Path) -> None:
    model = tiny_llama()
    model.config._name_or_path = str(hf_dir)
    q = get_evaluator("perplexity")(model, CTX, str(hf_dir / "text.txt"))
    assert q.metric == "perplexity" and q.higher_is_better is False
    assert q.value == pytest.approx(VOCAB, rel=0.1)  # untrained: about uniform
    assert q.extra["context"] == CONTEXT and q.extra["tokens"] % (CONTEXT - 1) == 0
    # bits per character = bits per token x tokens per character (words here: ~4 chars/token)
    assert 0.5 * math.log2(VOCAB) / 5 < q.extra["bits_per_char"] < math.log2(VOCAB)


def test_perplexity_evaluator_without_tokenizer_says_what_to_do(tmp_path: Path) -> None:
    model = tiny_llama()
    model.config._name_or_path = str(tmp_path)
    with pytest.raises(UserInputError, match=r"tokenizer\.json"):
        evaluators.evaluate_perplexity(model, CTX, None)


def test_perplexity_samples_are_whole_windows(hf_dir: Path) -> None:
    model = tiny_llama()
    model.config._name_or_path = str(hf_dir)
    text = str(hf_dir / "text.txt")
    q = evaluators.evaluate_perplexity(model, CTX, text, samples=3 * CONTEXT + 5)
    assert q.extra["tokens"] == 3 * (CONTEXT - 1)  # three windows of the context
    assert q.value == pytest.approx(VOCAB, rel=0.1)
    few = evaluators.evaluate_perplexity(model, CTX, text, samples=1, split="calibration")
    assert few.extra["tokens"] == CONTEXT - 1  # at least one window


def test_token_windows_cut_from_spaced_places() -> None:
    tok = austen_lm.load_tokenizer(austen_lm.builtin_tokenizer_path())
    text = " ".join(f"word{i} and some more text." for i in range(400))
    windows = evaluators.token_windows(text, tok, 3, 16)
    assert windows.shape == (3, 16) and windows.dtype == torch.int64
    assert not torch.equal(windows[0], windows[2])
    with pytest.raises(UserInputError, match="fewer than 16 tokens"):
        evaluators.token_windows("short", tok, 2, 16)
