"""``slimtorch.save``: write a model as an artifact directory (docs/artifact.md: the manifest).

The manifest records, besides what :mod:`slimtorch.formats.artifact` writes (tensors, aliases,
checksums): ``architecture`` (how to rebuild the model), ``modules`` (runtime modules that
replace standard layers), ``metadata`` (:meth:`ModelInfo.metadata`) and ``resized`` (shapes
structured pruning changed).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from slimtorch.artifact.resized import resized_entries
from slimtorch.core.errors import ConfigError
from slimtorch.core.info import ModelInfo, model_info
from slimtorch.formats.artifact import write_artifact
from slimtorch.formats.sizes import dense_safetensors_bytes
from slimtorch.formats.state import iter_states
from slimtorch.models.hf import hf_architecture
from slimtorch.runtime import RUNTIME_MODULES

ENTROPY = ("none", "huffman")


def runtime_modules(model: nn.Module) -> list[dict[str, Any]]:
    """The manifest's ``modules``: every runtime module with its name and JSON config."""
    out = []
    for name, module in model.named_modules():
        kind = type(module).__name__
        if kind in RUNTIME_MODULES and name:
            out.append({"name": name, "type": kind, "config": module.config()})  # type: ignore[operator]
    return out


def architecture_of(model: nn.Module, info: ModelInfo | None = None) -> dict[str, Any]:
    """The recorded architecture; else, for a transformers model, its config (data, rebuilt by
    transformers); else the model's class as a ``factory`` (which loads only with
    ``slimtorch.load(dir, model=...)`` or ``trust_factory=True``)."""
    arch = (info or model_info(model)).architecture
    if arch is not None:
        return dict(arch)
    hf = hf_architecture(model)
    if hf is not None:
        return hf
    cls = type(model)
    return {"kind": "factory", "ref": f"{cls.__module__}:{cls.__qualname__}"}


def save_artifact(
    model: nn.Module,
    path: str | Path,
    force: bool = False,
    metadata: dict[str, Any] | None = None,
    entropy: str | None = None,
) -> dict[str, Any]:
    """Write ``model`` as a compressed artifact at ``path``; returns the manifest.

    ``metadata`` sets :class:`~slimtorch.core.info.ModelInfo` fields for this artifact only.
    Refuses an existing ``path`` unless ``force``; never leaves a half-written directory.
    ``entropy`` ("none" or "huffman") defaults to the ``format`` of the recipe that compressed
    the model.
    """
    tensors = {k: v.detach() for k, v in model.state_dict().items()}
    states = {
        (f"{mname}.{param}" if mname else param): state
        for mname, _, param, state in iter_states(model)
    }
    info = model_info(model).updated(**(metadata or {}))
    if info.dense_bytes is None:
        info.dense_bytes = dense_safetensors_bytes(tensors)
    manifest = {
        "architecture": architecture_of(model, info),
        "modules": runtime_modules(model),
        "metadata": info.metadata(),
    }
    resized = resized_entries(model)
    if resized:
        manifest["resized"] = resized
    if entropy is None:
        entropy = str((info.recipe or {}).get("format", {}).get("entropy", "none"))
    if entropy not in ENTROPY:
        raise ConfigError(f"entropy must be 'none' or 'huffman', got {entropy!r}")
    return write_artifact(Path(path), tensors, states, manifest, force, entropy)
