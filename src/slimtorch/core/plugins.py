"""Plugins: packages that add builtin models, datasets, tasks and evaluators to the registries.

A plugin is a module named by an entry point of the group ``slimtorch.plugins``; importing it
registers what it provides. slimtorch's own bundled models (``slimtorch.zoo``) are found this
way, so that no generic package imports them; a user's package adds its own the same way::

    [project.entry-points."slimtorch.plugins"]
    mymodels = "mypkg.slimtorch_models"

Registries created with ``plugins=True`` load every plugin before their first lookup.
"""

from __future__ import annotations

import warnings
from importlib.metadata import entry_points

GROUP = "slimtorch.plugins"
_loaded = False


def load_plugins() -> None:
    """Import every ``slimtorch.plugins`` entry point once (later calls do nothing)."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    for ep in sorted(entry_points(group=GROUP), key=lambda e: e.name):
        try:
            ep.load()
        except Exception as exc:  # a broken third-party plugin must not break slimtorch
            if ep.value.startswith("slimtorch."):
                raise
            warnings.warn(
                f"slimtorch plugin {ep.name!r} ({ep.value}) failed to load: {exc}; its models,"
                " tasks and evaluators are unavailable (reinstall it, or uninstall it)",
                stacklevel=2,
            )
