"""calibrate.text: builtin:NAME texts and tokenizers from plugins, or files."""

from __future__ import annotations

from pathlib import Path

import pytest

from slimtorch.calibrate import text
from slimtorch.core.errors import UserInputError


def test_registered_text_and_tokenizer_resolve(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(text.TEXTS._items, "toy", lambda: "a toy text")
    tok = tmp_path / "tokenizer.json"
    tok.write_text("{}")
    monkeypatch.setitem(text.TOKENIZERS._items, "toy", lambda: tok)
    assert text.load_text("builtin:toy") == "a toy text"
    assert text.tokenizer_file("builtin:toy") == tok
    assert text.tokenizer_file(str(tmp_path)) == tok  # a directory holding one
    assert text.tokenizer_file(str(tok)) == tok


def test_bundled_names_come_from_the_zoo_plugin() -> None:
    assert {"austen", "wikipedia"} <= set(text.TEXTS.names())
    assert {"minilm", "austen-lm"} <= set(text.TOKENIZERS.names())
    assert text.tokenizer_file("builtin:austen-lm").name == "tokenizer.json"


def test_text_file(tmp_path: Path) -> None:
    path = tmp_path / "t.txt"
    path.write_text("héllo\nworld", encoding="utf-8")
    assert text.load_text(str(path)) == "héllo\nworld"


@pytest.mark.parametrize("name", ["builtin:ptb", "missing.txt", "data.csv"])
def test_load_text_rejects_unknown(name: str, tmp_path: Path) -> None:
    if name.endswith(".csv"):
        (tmp_path / name).write_text("a,b")
        name = str(tmp_path / name)
    with pytest.raises(UserInputError, match="builtin:austen"):
        text.load_text(name)


def test_load_text_rejects_bad_files(tmp_path: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(UserInputError, match="empty"):
        text.load_text(str(empty))
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(UserInputError, match="UTF-8"):
        text.load_text(str(latin))


def test_unknown_tokenizer_lists_the_known_ones(tmp_path: Path) -> None:
    with pytest.raises(UserInputError, match="builtin:austen-lm, builtin:minilm"):
        text.tokenizer_file("builtin:bert")
    with pytest.raises(UserInputError, match="no tokenizer at"):
        text.tokenizer_file(str(tmp_path / "missing.json"))


def test_model_tokenizer_order_given_found_builtin(tmp_path: Path) -> None:
    from slimtorch.calibrate.text import missing_tokenizer, model_tokenizer

    found = str(tmp_path / "tokenizer.json")
    assert model_tokenizer("builtin:austen-lm", None) == "builtin:austen-lm"  # its own
    assert model_tokenizer("some/dir", found) == found
    assert model_tokenizer("some/dir", found, "builtin:austen-lm") == "builtin:austen-lm"
    assert model_tokenizer("some/dir", None) is None
    assert model_tokenizer("builtin:lenet5-fashion", None) is None
    with pytest.raises(UserInputError, match="no tokenizer at"):
        model_tokenizer("some/dir", found, str(tmp_path / "missing.json"))
    assert "--tokenizer" in str(missing_tokenizer("some/dir"))
