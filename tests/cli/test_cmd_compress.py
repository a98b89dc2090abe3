"""`slimtorch compress` from the command line: a refused flag exits 2 and writes nothing."""

from __future__ import annotations

from pathlib import Path

from slimtorch.cli.main import main


def test_cli_max_memory_needs_a_checkpoint_dir(tmp_path: Path) -> None:
    code = main(["compress", "--model", "builtin:lenet5-fashion", "--recipe", "w4a16-rtn",
                 "--max-memory", "1GB", "--out", str(tmp_path / "x")])  # fmt: skip
    assert code == 2
    assert not (tmp_path / "x").exists()
