"""Training tasks: data bound to a model, giving batches and a loss (see core.methods.Task).

A factory takes the dataset spec (``builtin:NAME``, a path, or None for the model's default) and
returns a Task. Builtin models name their task; ``make_task`` builds it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from slimtorch.core.methods import Task
from slimtorch.core.registry import Registry

TaskFactory = Callable[[str | None], Task]

TASKS: Registry[TaskFactory] = Registry("task")


def make_task(name: str, data: str | None) -> Task:
    for mod in ("slimtorch.calibrate.classification", "slimtorch.calibrate.charlm"):
        importlib.import_module(mod)
    return TASKS.get(name)(data)
