"""The shipped recipe presets (``slimtorch recipes``)."""

from __future__ import annotations

from typing import Any

from slimtorch.recipe import list_presets


def presets() -> dict[str, Any]:
    """``{"presets": {name: description}}`` of every shipped preset."""
    return {"presets": list_presets()}
