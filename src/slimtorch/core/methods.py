"""The method protocol, the registry every recipe stage is looked up in, and how stages are found.

A method is a config class plus a pure ``apply(model, config, run)`` function. A technique
registers its methods with :func:`register_method` in its ``stages`` module or package
(``slimtorch/<technique>/stages.py``, or one module per family in ``slimtorch/<technique>/stages/``);
the technique's other files hold the maths and register nothing.

Nobody keeps a list of them: :func:`load_methods` finds every ``slimtorch.<package>.stages``
module (and every module inside a ``stages/`` package) on disk and imports it, and
:data:`METHODS` runs it before its first lookup, so a new stage file is never forgotten. Only the
packages that have stages are imported; ``import slimtorch`` itself stays side-effect free.

A method's name is ``<prefix>.<name>``; the prefix is the folder its stages live in, or an alias
from :data:`PREFIX_ALIASES` for a verb that reads better in a recipe:

==========  ==========================  ===============================================
prefix      folders                     methods
==========  ==========================  ===============================================
``train``   ``calibrate``, ``prune``    ``train.finetune`` (the shared training loop),
                                        ``train.slimmable`` (widths of a reordered model)
``fuse``    ``merge``                   ``fuse.batchnorm``, ``fuse.conv_bn_relu``
==========  ==========================  ===============================================
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from torch import nn

from slimtorch.core.config import StageConfig
from slimtorch.core.context import Context
from slimtorch.core.errors import ConfigError
from slimtorch.core.registry import Registry

STAGES = "stages"  # the module or package name that holds a technique's recipe stages

# method prefix -> the folders whose stages may use it (besides a folder's own name)
PREFIX_ALIASES: dict[str, tuple[str, ...]] = {
    "train": ("calibrate", "prune"),
    "fuse": ("merge",),
}


class Task(Protocol):
    """Training/calibration data bound to a model: batches and the loss on a batch."""

    name: str

    def train_batches(self, ctx: Context, steps: int, batch_size: int) -> Any:
        """Yield ``steps`` training batches."""

    def loss(self, model: nn.Module, batch: Any) -> Any:
        """Scalar training loss of ``model`` on ``batch``."""

    def forward(self, model: nn.Module, batch: Any) -> Any:
        """Run ``model`` on the inputs of ``batch`` (for calibration statistics)."""


@dataclass
class Run:
    """What a stage gets besides its config: the context, the optional task, and the model as
    it was before the recipe's first stage (a teacher for distillation; never modified)."""

    ctx: Context
    task: Task | None = None
    original: nn.Module | None = None
    # layers a layer-wise stage compressed without calibration data (mixture-of-experts experts
    # no calibration token was routed to): recorded in the model's info for the run's note
    data_free: list[str] = field(default_factory=list)

    def require_task(self, method: str) -> Task:
        """The task, or a ConfigError telling the user to give training data to ``method``."""
        if self.task is None:
            raise ConfigError(f"{method} trains the model: pass --data (or data= in Python)")
        return self.task


ApplyFn = Callable[[nn.Module, Any, Run], None]


@dataclass(frozen=True)
class MethodSpec:
    name: str
    config: type[StageConfig]
    apply: ApplyFn
    summary: str
    needs_data: bool = False
    # layer-wise methods also give a block compressor (calibrate.sequential.BlockCompressor)
    # built from (config, run), so that large models can be compressed block by block
    layerwise: Callable[[Any, Run], Any] | None = None
    # the options of a minimal stage (beyond the config's defaults): what a recipe must at least
    # say, e.g. {"ratio": 0.5}; tests/recipe/test_stages.py parses and applies it
    example: dict[str, Any] = field(default_factory=dict, hash=False)

    @property
    def prefix(self) -> str:
        return self.name.partition(".")[0]

    @property
    def folder(self) -> str:
        """The slimtorch package whose stages register this method (``prune``, ``calibrate``)."""
        parts = self.apply.__module__.split(".")
        return parts[1] if len(parts) > 1 and parts[0] == "slimtorch" else parts[0]


def stage_modules(root: str = "slimtorch") -> list[str]:
    """The dotted names of every ``<root>.<package>.stages`` module and of every module inside a
    ``stages`` package (any depth), found on disk: nothing but ``root`` is imported."""
    found: list[str] = []

    def walk(path: Path, prefix: str) -> None:
        for info in sorted(pkgutil.iter_modules([str(path)]), key=lambda i: i.name):
            found.append(f"{prefix}.{info.name}")
            if info.ispkg:
                walk(path / info.name, f"{prefix}.{info.name}")

    package = importlib.import_module(root)
    for base in [Path(p) for p in package.__path__]:
        for sub in sorted(pkgutil.iter_modules([str(base)]), key=lambda i: i.name):
            if not sub.ispkg:
                continue
            for info in pkgutil.iter_modules([str(base / sub.name)]):
                if info.name == STAGES:
                    name = f"{root}.{sub.name}.{STAGES}"
                    found.append(name)
                    if info.ispkg:
                        walk(base / sub.name / STAGES, name)
    return found


_loaded = False


def load_methods() -> None:
    """Import every stages module of slimtorch once (see :func:`stage_modules`), which
    registers every recipe method; later calls do nothing."""
    global _loaded
    if _loaded:
        return
    _loaded = True  # before importing: a stage module that looks a method up must not recurse
    try:
        for name in stage_modules():
            importlib.import_module(name)
    except BaseException:
        _loaded = False
        raise


class _MethodRegistry(Registry[MethodSpec]):
    """The method registry: loads every stages module before its first lookup."""

    def _ready(self) -> dict[str, MethodSpec]:
        load_methods()
        return super()._ready()


METHODS: Registry[MethodSpec] = _MethodRegistry("method")


def register_method(
    name: str,
    config: type[StageConfig],
    summary: str,
    needs_data: bool = False,
    layerwise: Callable[[Any, Run], Any] | None = None,
    example: dict[str, Any] | None = None,
) -> Callable[[ApplyFn], ApplyFn]:
    """Register ``apply`` as the recipe method ``name`` with its typed ``config``;
    ``layerwise(config, run)`` builds its block compressor when it is a layer-wise method;
    ``example`` gives the options of a minimal stage when the config's defaults are not one
    (a required option, or options that must be set one way or another)."""

    def deco(fn: ApplyFn) -> ApplyFn:
        spec = MethodSpec(name, config, fn, summary, needs_data, layerwise, dict(example or {}))
        METHODS.add(name, spec)
        return fn

    return deco
