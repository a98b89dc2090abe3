"""The run context passed to every method: seed, device, progress. No global state."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import torch
from tqdm.auto import tqdm

from slimtorch.core.errors import ConfigError

T = TypeVar("T")

DEVICE_HELP = "use --device cpu, cuda, cuda:N or auto (CUDA when torch sees a GPU, else CPU)"


def resolve_device(device: str | torch.device) -> str:
    """``device`` as the string torch takes, checked: ``"auto"`` becomes ``"cuda"`` when torch
    sees a GPU and ``"cpu"`` otherwise; a CUDA device torch cannot reach, or an unknown name,
    is a :class:`ConfigError` saying what to do. CUDA is queried only for ``cuda``/``auto``."""
    name = str(device).strip().lower()
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {device!r}; {DEVICE_HELP}") from None
    if dev.type == "cpu":
        return "cpu"
    if dev.type != "cuda":
        raise ConfigError(f"device {device!r} is not supported; {DEVICE_HELP}")
    if not torch.cuda.is_available():
        build = "without CUDA" if torch.version.cuda is None else f"with CUDA {torch.version.cuda}"
        raise ConfigError(
            f"device {device!r}: torch {torch.__version__} (built {build}) sees no CUDA GPU"
            f" (check the driver and CUDA_VISIBLE_DEVICES); {DEVICE_HELP}"
        )
    count = torch.cuda.device_count()
    if dev.index is not None and dev.index >= count:
        raise ConfigError(f"device {device!r}: only {count} CUDA device(s) visible; {DEVICE_HELP}")
    return str(dev)


@dataclass
class Context:
    """Everything a method needs to know about the run besides its own config.

    ``device`` is where calibration batches, training and the layer-wise maths run (the model is
    moved there by the caller, e.g. ``api.compress``); checked and normalised when the context
    is made (:func:`resolve_device`: ``"auto"`` picks CUDA when present)."""

    seed: int = 0
    device: str = "cpu"
    progress: bool = True

    def __post_init__(self) -> None:
        if self.device != "cpu":  # the default never touches torch.cuda
            self.device = resolve_device(self.device)

    @property
    def torch_device(self) -> torch.device:
        """``device`` as a ``torch.device``."""
        return torch.device(self.device)

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
