"""`slimtorch methods`: text, --json and --markdown listings of every registered method."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from slimtorch.cli.main import main
from slimtorch.core.methods import METHODS

DOC = Path(__file__).resolve().parents[2] / "docs" / "methods.md"


def test_json_lists_every_method_with_options(capsys) -> None:
    assert main(["methods", "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    names = [m["name"] for m in listing["methods"]]
    assert names == METHODS.names()
    magnitude = listing["methods"][names.index("prune.magnitude")]
    assert {"sparsity", "scope"} <= {o["name"] for o in magnitude["options"]}
    assert all({"name", "type", "default", "description"} <= set(o) for o in magnitude["options"])


def test_text_and_markdown(capsys) -> None:
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in METHODS.names())
    assert "    sparsity: float" in out and "applies to:" in out
    assert main(["methods", "--markdown"]) == 0
    assert capsys.readouterr().out == DOC.read_text()  # `... --markdown > docs/methods.md`


def test_json_and_markdown_exclude_each_other(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["methods", "--json", "--markdown"])
    assert exc.value.code == 2 and "not allowed with" in capsys.readouterr().err
