"""tests/bench: the bench scripts import their shared harness as ``import harness`` (they run as
``python bench/NAME.py``, which puts bench/ on the path); tests load them the same way."""

from __future__ import annotations

import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))
