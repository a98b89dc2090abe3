"""The method protocol and the registry every recipe stage is looked up in.

A method is a config class plus a pure ``apply(model, config, run)`` function; technique folders
register theirs with :func:`register_method`, and ``slimtorch.recipe`` imports them all.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from torch import nn

from slimtorch.core.config import StageConfig
from slimtorch.core.context import Context
from slimtorch.core.errors import ConfigError
from slimtorch.core.registry import Registry


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


METHODS: Registry[MethodSpec] = Registry("method")


def register_method(
    name: str,
    config: type[StageConfig],
    summary: str,
    needs_data: bool = False,
    layerwise: Callable[[Any, Run], Any] | None = None,
) -> Callable[[ApplyFn], ApplyFn]:
    """Register ``apply`` as the recipe method ``name`` with its typed ``config``;
    ``layerwise(config, run)`` builds its block compressor when it is a layer-wise method."""

    def deco(fn: ApplyFn) -> ApplyFn:
        METHODS.add(name, MethodSpec(name, config, fn, summary, needs_data, layerwise))
        return fn

    return deco
