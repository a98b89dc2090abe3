"""Training tasks: data bound to a model, giving batches and a loss (see core.methods.Task).

A factory takes the dataset spec (``builtin:NAME``, a path, or None for the task's default) and
returns a Task. Builtin models name their task; ``make_task`` builds it. Tasks with labels may
also offer ``loss_from_output(output, batch)``: the loss given the output of ``forward`` (a
distilling task then runs the student once for both its own loss and the teacher's). A factory
that tokenizes text takes a ``tokenizer`` keyword (a ``tokenizer.json`` path or
``builtin:NAME``): ``make_task`` passes the model's own tokenizer to it.

The bundled tasks (``classification``, ``charlm``, ``sentences``, ``causal-lm``) are registered
by the ``slimtorch.zoo`` plugin; a package adds its own with ``TASKS.add(name, factory)`` in a
``slimtorch.plugins`` entry point (see :mod:`slimtorch.core.plugins`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from slimtorch.core.methods import Task
from slimtorch.core.registry import Registry

TaskFactory = Callable[[str | None], Task]

TASKS: Registry[TaskFactory] = Registry("task", plugins=True)


def takes_tokenizer(name: str) -> bool:
    """Whether task ``name``'s factory tokenizes text (takes a ``tokenizer`` keyword)."""
    return "tokenizer" in inspect.signature(TASKS.get(name)).parameters


def make_task(name: str, data: str | None, tokenizer: str | None = None) -> Task:
    """The task ``name`` (e.g. ``classification``, ``causal-lm``) on dataset ``data``; an
    unknown name lists the known ones. ``tokenizer`` (the model's: a ``tokenizer.json`` path or
    ``builtin:NAME``) goes to factories that take one; the others ignore it."""
    factory: Any = TASKS.get(name)
    if tokenizer is not None and takes_tokenizer(name):
        return factory(data, tokenizer=tokenizer)  # type: ignore[no-any-return]
    return factory(data)  # type: ignore[no-any-return]
