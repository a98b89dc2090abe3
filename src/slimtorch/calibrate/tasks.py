"""Training tasks: data bound to a model, giving batches and a loss (see core.methods.Task).

A factory takes the dataset spec (``builtin:NAME``, a path, or None for the model's default) and
returns a Task. Builtin models name their task; ``make_task`` builds it. Tasks with labels may
also offer ``loss_from_output(output, batch)``: the loss given the output of ``forward`` (a
distilling task then runs the student once for both its own loss and the teacher's).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from slimtorch.core.methods import Task
from slimtorch.core.registry import Registry

TaskFactory = Callable[[str | None], Task]

TASKS: Registry[TaskFactory] = Registry("task")

_TASK_MODULES = (
    "slimtorch.calibrate.classification",
    "slimtorch.calibrate.charlm",
    "slimtorch.calibrate.sentences",
    "slimtorch.calibrate.lm",
)


def make_task(name: str, data: str | None) -> Task:
    """The task ``name`` (``classification``, ``charlm``, ``sentences``) on dataset ``data``."""
    for mod in _TASK_MODULES:
        importlib.import_module(mod)
    return TASKS.get(name)(data)
