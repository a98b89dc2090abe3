"""The run context passed to every method: seed, device, progress. No global state."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import torch
from tqdm.auto import tqdm

T = TypeVar("T")


@dataclass
class Context:
    """Everything a method needs to know about the run besides its own config."""

    seed: int = 0
    device: str = "cpu"
    progress: bool = True

    def generator(self, offset: int = 0) -> torch.Generator:
        """A fresh CPU generator seeded from the context (``offset`` decorrelates users)."""
        gen = torch.Generator()
        gen.manual_seed(self.seed + offset)
        return gen

    def progress_bar(self, items: Iterable[T], desc: str, total: int | None = None) -> Iterator[T]:
        """Wrap ``items`` in a tqdm bar on stderr unless progress is off."""
        # On a terminal, redraw often; in logs, print a line at most every 10 seconds.
        interval = 0.1 if sys.stderr.isatty() else 10.0
        bar = tqdm(
            items,
            desc=desc,
            total=total,
            disable=not self.progress,
            leave=False,
            mininterval=interval,
        )
        return iter(bar)
