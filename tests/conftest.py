"""Test-suite wide fixtures: fail any test that leaves files behind."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch

# Two cores shared with other jobs: one intra-op thread keeps LSTM tests from thrashing.
torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]


def _snapshot() -> set[str]:
    entries = {f"cwd:{p}" for p in os.listdir(os.getcwd())}
    entries |= {f"root:{p}" for p in os.listdir(ROOT)}
    tmp = Path(tempfile.gettempdir())
    entries |= {f"tmp:{p.name}" for p in tmp.glob("slimtorch*")}
    return entries


@pytest.fixture(autouse=True)
def no_files_left_behind():
    before = _snapshot()
    yield
    left = sorted(_snapshot() - before)
    left = [e for e in left if not e.endswith((".pytest_cache", "__pycache__", ".mypy_cache"))]
    assert not left, f"test left files behind: {left}"
