"""Imports flow one way: the table in docs/design.md is the rule, checked here on the source.

Every import form counts: ``import slimtorch.x``, ``from slimtorch.x import y``,
``from slimtorch import x``, relative imports and ``importlib.import_module("slimtorch.x...")``
strings. Units are the subpackages and the top-level modules (``api``); the package root
(``slimtorch/__init__.py``: version and lazy API) may be imported by anyone.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "src" / "slimtorch"
DESIGN = ROOT / "docs" / "design.md"
BUNDLED = "zoo"  # the bundled models and data: imported by nothing but the plugin entry point


def units() -> set[str]:
    """Subpackages and top-level modules of slimtorch (the rooms of the layering table)."""
    subs = {p.name for p in PKG.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    mods = {p.stem for p in PKG.glob("*.py") if p.stem != "__init__"}
    return subs | mods


def allowed_table(text: str | None = None) -> dict[str, set[str]]:
    """The ``may import`` column of the table between the layers markers of docs/design.md."""
    text = DESIGN.read_text() if text is None else text
    m = re.search(r"<!-- layers:begin -->(.*?)<!-- layers:end -->", text, re.S)
    assert m, "docs/design.md lost its layers table markers"
    table: dict[str, set[str]] = {}
    for line in m.group(1).splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 2 or not cells[0].startswith("`"):
            continue
        may = set(re.findall(r"`([a-z_]+)`", cells[-1]))
        for name in re.findall(r"`([a-z_]+)`", cells[0]):
            table[name] = may
    return table


def _unit_of(path: Path) -> str:
    rel = path.relative_to(PKG)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _target(parts: list[str], known: set[str]) -> str | None:
    """The unit a dotted ``slimtorch....`` name lands in (None: the package root)."""
    if len(parts) < 2 or parts[0] != "slimtorch":
        return None
    return parts[1] if parts[1] in known else None


def imports_of(path: Path, known: set[str], source: str | None = None) -> set[str]:
    """Every slimtorch unit ``path`` (or ``source`` as if it were there) imports, in any form."""
    tree = ast.parse(path.read_text() if source is None else source)
    found: set[str] = set()
    package = ["slimtorch", *path.relative_to(PKG).parts[:-1]]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                found.add(_target(a.name.split("."), known) or "")
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            parts = [*base, *(node.module.split(".") if node.module else [])]
            if len(parts) == 1 and parts[0] == "slimtorch":  # from slimtorch import api, x
                found.update(a.name for a in node.names if a.name in known)
            else:
                found.add(_target(parts, known) or "")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            parts = node.value.split(".")
            if len(parts) > 1 and parts[0] == "slimtorch" and parts[1].isidentifier():
                found.add(_target(parts, known) or "")
    found.discard("")
    return found


def test_table_names_every_unit() -> None:
    table = allowed_table()
    assert set(table) == units(), (
        f"docs/design.md's layers table and src/slimtorch differ: only in the table"
        f" {sorted(set(table) - units())}, only in the code {sorted(units() - set(table))}"
    )


def test_imports_flow_one_way() -> None:
    table, known = allowed_table(), units()
    bad = []
    for path in sorted(PKG.rglob("*.py")):
        if path == PKG / "__init__.py":
            continue
        unit = _unit_of(path)
        for dep in sorted(imports_of(path, known) - table.get(unit, set()) - {unit}):
            bad.append(f"{path.relative_to(PKG)} imports slimtorch.{dep}")
    assert not bad, "layering violations (see docs/design.md):\n" + "\n".join(bad)


def test_nothing_generic_imports_the_bundled_models() -> None:
    table = allowed_table()
    assert BUNDLED in table
    assert [u for u, may in table.items() if BUNDLED in may] == []


def test_table_has_no_cycles() -> None:
    table = allowed_table()
    order: list[str] = []
    seen: set[str] = set()

    def visit(u: str, stack: tuple[str, ...]) -> None:
        assert u not in stack, f"cycle in the layers table: {' -> '.join((*stack, u))}"
        if u in seen:
            return
        for d in sorted(table.get(u, set())):
            visit(d, (*stack, u))
        seen.add(u)
        order.append(u)

    for u in sorted(table):
        visit(u, ())


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("from slimtorch import api", {"api"}),
        ("import slimtorch.zoo.lenet", {"zoo"}),
        ("from slimtorch.zoo import lenet", {"zoo"}),
        ("from . import sensitivity", {"search"}),
        ("from ..eval import quality", {"eval"}),
        ("importlib.import_module('slimtorch.zoo.minilm')", {"zoo"}),
        ("from slimtorch import __version__", set()),
    ],
)
def test_every_import_form_is_seen(source: str, expected: set[str]) -> None:
    path = PKG / "search" / "_probe.py"  # as if inside search/; never written
    assert imports_of(path, units(), source) == expected


def test_import_has_no_side_effects() -> None:
    import subprocess
    import sys

    code = (
        "import warnings, torch; f = list(warnings.filters); import slimtorch;"
        "assert list(warnings.filters) == f; import sys;"
        "assert 'slimtorch.api' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
