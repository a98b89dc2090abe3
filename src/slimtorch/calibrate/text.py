"""Text and tokenizers by name: ``builtin:NAME`` specs that plugins provide, or files.

Generic code names bundled text only by such specs, never by importing the package that holds
it. :data:`TEXTS` maps ``NAME`` to a function returning the text of ``builtin:NAME`` (the zoo
registers ``austen`` and ``wikipedia``); :data:`TOKENIZERS` maps ``NAME`` to a function
returning the path of a ``tokenizer.json`` (the zoo registers ``minilm`` and ``austen-lm``).

A causal LM's text is tokenized with the model's own tokenizer (:func:`model_tokenizer`): the one
given with ``--tokenizer``, else the ``tokenizer.json`` beside its ``config.json``, else its
builtin's registered tokenizer; a causal LM with none gets :func:`missing_tokenizer`'s error.
:data:`TOKEN_WINDOWS` cuts token windows of a split of a text spec (the LLM quality suite's).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from slimtorch.core.errors import UserInputError
from slimtorch.core.registry import Registry

BUILTIN = "builtin:"

TEXTS: Registry[Callable[[], str]] = Registry("text dataset", plugins=True)
TOKENIZERS: Registry[Callable[[], Path]] = Registry("tokenizer", plugins=True)
# "heldout" / "train" -> (text spec, tokenizer.json, n, length) -> int64 token windows
# [<= n, length] from n evenly spaced places of that split of the text (the zoo registers both)
TOKEN_WINDOWS: Registry[Callable[[str, Path, int, int], Any]] = Registry(
    "token windows", plugins=True
)


def _builtins(registry: Registry[Callable[[], str]] | Registry[Callable[[], Path]]) -> str:
    return ", ".join(BUILTIN + n for n in registry.names())


def read_text_file(spec: str) -> str:
    """The text of the UTF-8 ``.txt`` file ``spec`` (an error names the fix)."""
    path = Path(spec)
    if not path.is_file() or path.suffix.lower() != ".txt":
        raise UserInputError(
            f"text data {spec!r} is not an existing .txt file; give a UTF-8 .txt path or"
            f" one of {_builtins(TEXTS)}"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UserInputError(f"{path} is not valid UTF-8 ({exc}); re-encode it as UTF-8") from None
    if not text:
        raise UserInputError(f"{path} is empty; give a file with text in it")
    return text


def load_text(spec: str) -> str:
    """``builtin:NAME`` (a registered text, e.g. builtin:austen) or a path to a UTF-8 .txt."""
    if spec.startswith(BUILTIN):
        name = spec[len(BUILTIN) :]
        if name not in TEXTS:
            raise UserInputError(
                f"unknown text dataset {spec!r}; use one of {_builtins(TEXTS)} or a path to a"
                " .txt file"
            )
        return TEXTS.get(name)()
    return read_text_file(spec)


def tokenizer_file(spec: str) -> Path:
    """``tokenizer.json`` of ``spec``: ``builtin:NAME`` (a registered tokenizer, e.g.
    builtin:minilm), a ``tokenizer.json`` file, or a directory holding one."""
    if spec.startswith(BUILTIN):
        name = spec[len(BUILTIN) :]
        if name not in TOKENIZERS:
            raise UserInputError(
                f"unknown tokenizer {spec!r}; use one of {_builtins(TOKENIZERS)}, a tokenizer.json"
                " file or a directory holding one"
            )
        return TOKENIZERS.get(name)()
    path = Path(spec)
    path = path / "tokenizer.json" if path.is_dir() else path
    if not path.is_file():
        raise UserInputError(
            f"no tokenizer at {spec!r}: give a tokenizer.json file or a directory holding one"
        )
    return path


def model_tokenizer(source: str, found: str | None, given: str | None = None) -> str | None:
    """The tokenizer spec of the model loaded from ``source``: ``given`` (``--tokenizer``,
    checked to exist), else ``found`` (the ``tokenizer.json`` found with the model), else
    ``source`` itself when it is a ``builtin:NAME`` with a registered tokenizer; None if none."""
    if given:
        tokenizer_file(given)
        return given
    if found:
        return found
    if source.startswith(BUILTIN) and source[len(BUILTIN) :] in TOKENIZERS:
        return source
    return None


def missing_tokenizer(source: str) -> UserInputError:
    """The error for a causal LM whose text would need a tokenizer it does not have."""
    return UserInputError(
        f"{source} is a causal LM without a tokenizer: its text must be tokenized with the"
        " model's own tokenizer, and there is no tokenizer.json beside its config.json; give"
        " --tokenizer PATH (its tokenizer.json, or a directory holding one) or"
        f" --tokenizer builtin:NAME (one of {_builtins(TOKENIZERS)})"
    )
