"""A model from a slimtorch artifact, and the attributes that travel with a model into one.

``set_architecture`` records how to rebuild a model (see :func:`registry.rebuild`) and
``get_metadata`` what travels with it (source, recipe, evaluator, ...). :func:`load_artifact`
is what ``slimtorch.load`` runs, kept here so that techniques (distillation teachers) can load
artifacts without importing the API.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from slimtorch.core.errors import ArtifactError
from slimtorch.formats.artifact import read_artifact
from slimtorch.formats.state import set_state
from slimtorch.graph.weights import replace_module
from slimtorch.models.registry import rebuild
from slimtorch.runtime import RUNTIME_MODULES

ARCH_ATTR = "_slimtorch_architecture"
META_ATTR = "_slimtorch_metadata"


def set_architecture(model: nn.Module, architecture: dict[str, Any]) -> None:
    """Record how to rebuild ``model`` (see slimtorch.models.registry.rebuild)."""
    model.__dict__[ARCH_ATTR] = architecture


def get_architecture(model: nn.Module) -> dict[str, Any] | None:
    arch = model.__dict__.get(ARCH_ATTR)
    return dict(arch) if isinstance(arch, dict) else None


def get_metadata(model: nn.Module) -> dict[str, Any]:
    """Metadata that travels with a model into its artifact (source, recipe, evaluator, ...)."""
    meta: dict[str, Any] = model.__dict__.setdefault(META_ATTR, {})
    return meta


def _retie(model: nn.Module, aliases: dict[str, str]) -> None:
    """Parameters stored once as aliases (tied weights) become one Parameter again."""
    params = dict(model.named_parameters(remove_duplicate=False))
    for alias, target in aliases.items():
        if alias in params and target in params and params[alias] is not params[target]:
            mname, _, pname = alias.rpartition(".")
            setattr(model.get_submodule(mname) if mname else model, pname, params[target])


def load_artifact(path: str | Path) -> nn.Module:
    """Rebuild the model saved at ``path``: no pickle, outputs identical to the saved model."""
    art = read_artifact(Path(path))
    arch = art.manifest.get("architecture")
    if not isinstance(arch, dict):
        raise ArtifactError(f"{path}: manifest has no architecture; re-create the artifact")
    model = rebuild(arch)
    for entry in art.manifest.get("modules", []):
        cls = RUNTIME_MODULES.get(entry["type"])
        replace_module(model, entry["name"], cls.from_config(entry["config"]))  # type: ignore[attr-defined]
    missing, unexpected = model.load_state_dict(art.tensors, strict=False)
    if missing or unexpected:
        raise ArtifactError(
            f"{path}: artifact does not fit its architecture (missing {missing[:5]},"
            f" unexpected {unexpected[:5]}); re-create it with this slimtorch version"
        )
    _retie(model, art.manifest.get("aliases", {}))
    for name, state in art.states.items():
        mname, _, param = name.rpartition(".")
        set_state(model.get_submodule(mname) if mname else model, param, state)
    set_architecture(model, arch)
    get_metadata(model).update(art.manifest.get("metadata", {}))
    return model.eval()
