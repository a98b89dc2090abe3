"""calibrate.tasks: one task registry, filled by plugins; make_task builds a task by name."""

from __future__ import annotations

import pytest

from slimtorch.calibrate.tasks import TASKS, make_task
from slimtorch.core.errors import ConfigError


class Recorder:
    """A throw-away task that remembers its data spec."""

    name = "recorder"

    def __init__(self, data: str | None) -> None:
        self.data = data


def test_a_registered_factory_builds_the_task(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(TASKS._items, "recorder", Recorder)
    task = make_task("recorder", "builtin:x")
    assert isinstance(task, Recorder) and task.data == "builtin:x"
    assert make_task("recorder", None).data is None


def test_bundled_tasks_come_from_the_zoo_plugin() -> None:
    assert {"classification", "charlm", "sentences", "causal-lm"} <= set(TASKS.names())


def test_unknown_task_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError) as err:
        make_task("clasification", None)
    msg = str(err.value)
    assert "did you mean 'classification'?" in msg
    assert "causal-lm, charlm, classification, sentences" in msg
