"""zoo/__init__: every module of the zoo is imported (so it registers), and only the plugin
entry point brings the zoo in."""

from __future__ import annotations

import ast
import importlib
import pkgutil
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest

import slimtorch.zoo as zoo

SCRIPT = "train_"  # training scripts run as `python -m`; they register nothing


def test_every_module_is_imported_by_the_package() -> None:
    tree = ast.parse(Path(zoo.__file__).read_text())
    imported = {a.name for n in tree.body if isinstance(n, ast.ImportFrom) for a in n.names}
    modules = {m.name for m in pkgutil.iter_modules(zoo.__path__) if not m.name.startswith(SCRIPT)}
    assert modules - imported == set(), "add these to slimtorch/zoo/__init__.py"
    assert imported - modules == set()


def test_the_zoo_is_the_slimtorch_plugin() -> None:
    found = {ep.name: ep.value for ep in entry_points(group="slimtorch.plugins")}
    assert found.get("zoo") == "slimtorch.zoo"


def test_registries_load_the_zoo_on_first_lookup() -> None:
    code = (
        "import sys; from slimtorch.eval.quality import get_evaluator;"
        "from slimtorch.calibrate.tasks import TASKS;"
        "assert 'slimtorch.zoo' not in sys.modules;"
        "get_evaluator('accuracy'); assert 'slimtorch.zoo' in sys.modules;"
        "assert 'causal-lm' in TASKS"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("script", ["train_lenet", "train_resnet", "train_austen_lm"])
def test_training_scripts_still_run(script: str, capsys: pytest.CaptureFixture[str]) -> None:
    module = importlib.import_module(f"slimtorch.zoo.{script}")  # `python -m` runs its main
    with pytest.raises(SystemExit) as done:
        module.main(["--help"])
    assert done.value.code == 0 and "usage:" in capsys.readouterr().out
