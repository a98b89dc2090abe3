"""Training tasks: data bound to a model, giving batches and a loss (see core.methods.Task).

A factory takes the dataset spec (``builtin:NAME``, a path, or None for the task's default) and
returns a Task. Builtin models name their task; ``make_task`` builds it. Tasks with labels may
also offer ``loss_from_output(output, batch)``: the loss given the output of ``forward`` (a
distilling task then runs the student once for both its own loss and the teacher's).

The bundled tasks (``classification``, ``charlm``, ``sentences``, ``causal-lm``) are registered
by the ``slimtorch.zoo`` plugin; a package adds its own with ``TASKS.add(name, factory)`` in a
``slimtorch.plugins`` entry point (see :mod:`slimtorch.core.plugins`).
"""

from __future__ import annotations

from collections.abc import Callable

from slimtorch.core.methods import Task
from slimtorch.core.registry import Registry

TaskFactory = Callable[[str | None], Task]

TASKS: Registry[TaskFactory] = Registry("task", plugins=True)


def make_task(name: str, data: str | None) -> Task:
    """The task ``name`` (e.g. ``classification``, ``causal-lm``) on dataset ``data``; an
    unknown name lists the known ones."""
    return TASKS.get(name)(data)
