"""Text corpora: Austen (Debian r-cran-janeaustenr), gensim's Wikipedia sample, Lee documents."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from slimtorch.calibrate.text import load_text
from slimtorch.core.errors import UserInputError
from slimtorch.zoo import data_text

TITLES = [
    "Sense & Sensibility",
    "Pride & Prejudice",
    "Mansfield Park",
    "Emma",
    "Northanger Abbey",
    "Persuasion",
]


def test_austen_six_novels() -> None:
    books = data_text.load_austen()
    assert list(books) == TITLES
    assert sum(len(t) for t in books.values()) == 4_025_022
    assert books["Emma"].startswith("EMMA\n\nBy Jane Austen")
    assert "It is a truth universally acknowledged" in books["Pride & Prejudice"]
    assert data_text.load_austen() is books  # cached


def test_austen_split_is_last_tenth_of_each_novel() -> None:
    books = data_text.load_austen()
    for text in books.values():
        train = data_text.split_text(text, "train")
        held = data_text.split_text(text, "heldout")
        assert train + held == text
        assert len(held) == int(len(text) * 0.1)
    heldout = data_text.austen_split("heldout")
    train = data_text.austen_split("train")
    assert len(heldout) == sum(int(len(t) * 0.1) for t in books.values()) + 2 * 5
    assert len(train) + len(heldout) == 4_025_022 + 2 * 2 * 5
    assert heldout.endswith(books["Persuasion"][-200:])
    assert books["Persuasion"][-200:] not in train


def test_split_rejects_unknown_split() -> None:
    with pytest.raises(UserInputError, match="'train' or 'heldout'"):
        data_text.split_text("abc", "test")  # type: ignore[arg-type]


def test_missing_austen_names_package_and_fix(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(data_text, "austen_dirs", lambda: [tmp_path])
    with pytest.raises(UserInputError, match=r"make install.*r-cran-janeaustenr"):
        data_text._find_austen()


def test_env_var_is_searched_first(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(data_text.AUSTEN_ENV, str(tmp_path))
    assert data_text.austen_dirs()[0] == tmp_path
    found = data_text._find_austen()  # tmp_path is empty: falls through to the installed copy
    assert found.name == "data" and (found / "Rdata.rdb").is_file()


def test_wikipedia_articles() -> None:
    articles = data_text.load_wikipedia()
    assert len(articles) == 106
    assert 3_000_000 < sum(len(a) for a in articles) < 3_200_000
    assert not any(a.lower().startswith("#redirect") for a in articles)
    assert "Anarchism" in articles[0][:100]


def test_lee_documents_and_matrix() -> None:
    docs, human = data_text.load_lee()
    assert len(docs) == 50 and human.shape == (50, 50)
    assert np.count_nonzero(np.triu(human, 1)) == 1225
    assert np.all(np.tril(human, -1) == 0)
    assert np.allclose(np.diag(human), 1.0)
    assert docs[0].startswith("The national executive of the strife-torn Democrats")


def test_registers_builtin_texts() -> None:
    assert len(load_text("builtin:austen")) == 4_025_022 + 2 * 5
    assert load_text("builtin:austen") == data_text.austen_text()
    assert load_text("builtin:wikipedia") == "\n\n".join(data_text.load_wikipedia())
