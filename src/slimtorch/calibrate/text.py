"""Text and tokenizers by name: ``builtin:NAME`` specs that plugins provide, or files.

Generic code names bundled text only by such specs, never by importing the package that holds
it. :data:`TEXTS` maps ``NAME`` to a function returning the text of ``builtin:NAME`` (the zoo
registers ``austen`` and ``wikipedia``); :data:`TOKENIZERS` maps ``NAME`` to a function
returning the path of a ``tokenizer.json`` (the zoo registers ``minilm`` and ``austen-lm``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from slimtorch.core.errors import UserInputError
from slimtorch.core.registry import Registry

BUILTIN = "builtin:"

TEXTS: Registry[Callable[[], str]] = Registry("text dataset", plugins=True)
TOKENIZERS: Registry[Callable[[], Path]] = Registry("tokenizer", plugins=True)


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
