"""Imports flow one way (see DESIGN.md): checked on the source with ast."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "src" / "slimtorch"

BASE = {"core"}
TECHNIQUES = {"prune", "quantize", "share", "lowrank", "distill", "merge"}
LOWER = {"core", "formats", "graph", "runtime", "models", "artifact", "calibrate"}
ALLOWED: dict[str, set[str]] = {
    "core": set(),
    "formats": {"core"},
    "graph": {"core", "formats"},
    "runtime": {"core", "formats", "graph"},
    "models": {"core", "formats", "graph", "runtime"},
    "artifact": {"core", "formats", "graph", "runtime", "models"},
    "calibrate": {"core", "formats", "graph", "models", "artifact", "zoo"},
    **{t: LOWER for t in TECHNIQUES},
    "export": LOWER,
    "zoo": LOWER | {"eval"},
    "eval": LOWER | {"zoo"},
    "report": LOWER | {"eval"},
    "recipe": LOWER | TECHNIQUES,
    "search": LOWER | TECHNIQUES | {"eval", "recipe", "export", "zoo"},
    "testing": LOWER | TECHNIQUES | {"eval", "recipe"},
}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        for name in names:
            parts = name.split(".")
            if parts[0] == "slimtorch" and len(parts) > 1:
                found.add(parts[1])
    # string imports (importlib.import_module("slimtorch.x..."))
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            parts = node.value.split(".")
            if parts[0] == "slimtorch" and len(parts) > 2 and parts[1].isidentifier():
                found.add(parts[1])
    return found


def test_imports_flow_one_way() -> None:
    bad = []
    for pkg, allowed in ALLOWED.items():
        for path in sorted((PKG / pkg).rglob("*.py")):
            for dep in _imports(path) - allowed - {pkg}:
                bad.append(f"{path.relative_to(PKG)} imports slimtorch.{dep}")
    assert not bad, "layering violations:\n" + "\n".join(bad)


def test_every_subpackage_is_layered() -> None:
    subs = {p.name for p in PKG.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert subs - {"cli"} <= set(ALLOWED), subs - set(ALLOWED)


def test_import_has_no_side_effects() -> None:
    import subprocess
    import sys

    code = (
        "import warnings, torch; f = list(warnings.filters); import slimtorch;"
        "assert list(warnings.filters) == f; import sys;"
        "assert 'slimtorch.api' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
