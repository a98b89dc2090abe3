"""Real text corpora found offline: Jane Austen, English Wikipedia articles, the Lee documents.

* ``builtin:austen`` — the six novels of the Debian package ``r-cran-janeaustenr`` (R lazy-load
  database ``data/Rdata.{rdx,rdb}``, parsed with the ``rdata`` package, no R needed).
* ``builtin:wikipedia`` — 106 articles from gensim's test data (redirect pages skipped).
* Lee & Pincombe — 50 news documents and a 50x50 human similarity matrix (gensim test data).

The two texts are registered as ``builtin:austen`` and ``builtin:wikipedia`` in
:data:`slimtorch.calibrate.text.TEXTS`, whose ``load_text`` reads them (or a ``.txt`` file).

Every loader is cached per process; none touches the network.
"""

from __future__ import annotations

import bz2
import importlib.util
import os
import sys
import zlib
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import numpy as np

from slimtorch.calibrate.text import TEXTS
from slimtorch.core.errors import UserInputError

AUSTEN_PACKAGE = "r-cran-janeaustenr"
AUSTEN_ENV = "SLIMTORCH_JANEAUSTENR_DIR"
_R_SUBDIR = "usr/lib/R/site-library/janeaustenr"
# Object names in the R database -> titles, in order of publication (as janeaustenr lists them).
_AUSTEN_TITLES = {
    "sensesensibility": "Sense & Sensibility",
    "prideprejudice": "Pride & Prejudice",
    "mansfieldpark": "Mansfield Park",
    "emma": "Emma",
    "northangerabbey": "Northanger Abbey",
    "persuasion": "Persuasion",
}
HELDOUT_FRACTION = 0.1
_WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"


def austen_dirs() -> list[Path]:
    """Where the janeaustenr R package is looked for, in order."""
    dirs = []
    if os.environ.get(AUSTEN_ENV):
        dirs.append(Path(os.environ[AUSTEN_ENV]))
    dirs.append(Path(sys.prefix) / "share" / "slimtorch" / "debian" / _R_SUBDIR)
    dirs.append(Path("/") / _R_SUBDIR)
    return dirs


def _find_austen() -> Path:
    for d in austen_dirs():
        if (d / "data" / "Rdata.rdx").is_file() and (d / "data" / "Rdata.rdb").is_file():
            return d / "data"
    tried = ", ".join(str(d) for d in austen_dirs())
    raise UserInputError(
        f"the Jane Austen texts are missing (looked for data/Rdata.rdx in {tried}); run"
        f" `make install`, which unpacks the Debian package {AUSTEN_PACKAGE} into"
        f" {sys.prefix}/share/slimtorch/debian, or set {AUSTEN_ENV} to an unpacked janeaustenr"
        " directory"
    )


def _parse_r(raw: bytes) -> Any:
    import rdata

    return rdata.parser.parse_data(raw, extension=".rds").object


def _r_strings(obj: Any, where: str) -> list[str]:
    """The elements of an R character vector (``NA`` becomes ``""``)."""
    from rdata.parser import CharFlags, RObjectType

    if obj.info.type != RObjectType.STR:
        raise UserInputError(f"{where} is not a character vector; reinstall {AUSTEN_PACKAGE}")
    out = []
    for char in obj.value:
        raw = char.value
        if raw is None:
            out.append("")
        else:
            latin1 = bool(char.info.gp & CharFlags.LATIN1)
            out.append(raw.decode("latin-1" if latin1 else "utf-8", errors="replace"))
    return out


def _r_offsets(index: Any) -> dict[str, tuple[int, int]]:
    """``variables`` of a lazy-load index: object name -> (offset, length) in the .rdb file."""
    import rdata

    converted = rdata.conversion.convert(index)
    return {str(k): (int(v[0]), int(v[1])) for k, v in converted["variables"].items()}


def read_r_lazyload(data_dir: Path) -> dict[str, list[str]]:
    """Every object (character vectors only) of an R lazy-load database (``Rdata.rdx`` index + ``Rdata.rdb``)."""
    try:
        offsets = _r_offsets(_parse_r((data_dir / "Rdata.rdx").read_bytes()))
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise UserInputError(
            f"{data_dir / 'Rdata.rdx'} is not an R lazy-load index ({exc}); reinstall {AUSTEN_PACKAGE}"
        ) from None
    blob = (data_dir / "Rdata.rdb").read_bytes()
    out: dict[str, list[str]] = {}
    for name, (offset, length) in offsets.items():
        # Each entry: 4-byte big-endian uncompressed length, then a zlib stream.
        raw = zlib.decompress(blob[offset + 4 : offset + length])
        out[name] = _r_strings(_parse_r(raw), f"{name} in {data_dir / 'Rdata.rdb'}")
    return out


@lru_cache(maxsize=1)
def load_austen() -> dict[str, str]:
    """The six Austen novels: title -> text (the package's lines joined with ``\\n``)."""
    vectors = read_r_lazyload(_find_austen())
    missing = sorted(set(_AUSTEN_TITLES) - set(vectors))
    if missing:
        raise UserInputError(
            f"janeaustenr data lacks {missing}; reinstall {AUSTEN_PACKAGE} (`make install`)"
        )
    return {title: "\n".join(vectors[key]) for key, title in _AUSTEN_TITLES.items()}


def split_text(text: str, split: Literal["train", "heldout"]) -> str:
    """``heldout``: the last :data:`HELDOUT_FRACTION` of ``text``'s characters; ``train``: the rest."""
    cut = len(text) - int(len(text) * HELDOUT_FRACTION)
    if split == "train":
        return text[:cut]
    if split == "heldout":
        return text[cut:]
    raise UserInputError(f"unknown split {split!r}; use 'train' or 'heldout'")


@lru_cache(maxsize=2)
def austen_split(split: Literal["train", "heldout"]) -> str:
    """Train or held-out Austen text: per novel, the held-out part is its last 10% of characters.

    The parts of the six novels are joined with a blank line, in publication order.
    """
    return "\n\n".join(split_text(text, split) for text in load_austen().values())


def gensim_test_data() -> Path:
    """The directory of gensim's bundled test data (found without importing gensim)."""
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise UserInputError(
            "gensim is not installed; `pip install 'slimtorch[data]'` (gensim>=4.3)"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "test" / "test_data"


def _gensim_file(name: str) -> Path:
    path = gensim_test_data() / name
    if not path.is_file():
        raise UserInputError(f"gensim test data file {path} is missing; reinstall gensim>=4.3")
    return path


@lru_cache(maxsize=1)
def load_wikipedia() -> list[str]:
    """The article texts of gensim's Wikipedia sample, markup filtered, redirects skipped."""
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    articles = []
    with bz2.open(_gensim_file(_WIKI_FILE), "rb") as f:
        for _title, text, _pageid in extract_pages(f):
            if text.lstrip().lower().startswith("#redirect"):
                continue
            clean = filter_wiki(text).strip()
            if clean:
                articles.append(clean)
    return articles


@lru_cache(maxsize=1)
def load_lee() -> tuple[list[str], np.ndarray]:
    """Lee & Pincombe: 50 documents and the 50x50 human similarity matrix (upper triangle set)."""
    lines = _gensim_file("lee.cor").read_text(encoding="latin-1").splitlines()
    docs = [line.strip() for line in lines if line.strip()]
    matrix = np.loadtxt(_gensim_file("similarities0-1.txt"), dtype=np.float64)
    if matrix.shape != (len(docs), len(docs)):
        raise UserInputError(
            f"Lee data mismatch: {len(docs)} documents but a {matrix.shape} matrix; reinstall gensim"
        )
    matrix.setflags(write=False)
    return docs, matrix


def austen_text() -> str:
    """``builtin:austen``: the six novels, joined with a blank line, in publication order."""
    return "\n\n".join(load_austen().values())


def wikipedia_text() -> str:
    """``builtin:wikipedia``: the articles, joined with a blank line."""
    return "\n\n".join(load_wikipedia())


TEXTS.add("austen", austen_text)
TEXTS.add("wikipedia", wikipedia_text)
