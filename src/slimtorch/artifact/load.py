"""``slimtorch.load``: rebuild a model from an artifact directory, reading data only.

Loading never unpickles and never imports or calls anything the artifact names: ``builtin``
and ``hf`` architectures are data (a registered name; a transformers class and config), and a
``factory`` architecture (``package.module:callable``) is rebuilt only from the ``model`` the
caller passes or with ``trust_factory=True`` (docs/artifact.md: the threat model). Kept apart from
the API so that techniques (distillation teachers) can load artifacts.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from slimtorch.artifact.kernels import use_kernels
from slimtorch.artifact.resized import apply_resized
from slimtorch.artifact.widths import narrow
from slimtorch.core.errors import ArtifactError, UserInputError
from slimtorch.core.info import ModelInfo, set_model_info
from slimtorch.formats.artifact import RECREATE, read_artifact, read_manifest
from slimtorch.formats.state import set_state
from slimtorch.graph.weights import replace_module
from slimtorch.models.registry import rebuild, untrusted_factory_message
from slimtorch.runtime import RUNTIME_MODULES

# what ``model=`` accepts: the architecture itself, or a zero-argument callable building it
ModelOrFactory = nn.Module | Callable[[], nn.Module]


def _retie(model: nn.Module, aliases: dict[str, str]) -> None:
    """Parameters stored once as aliases (tied weights) become one Parameter again."""
    params = dict(model.named_parameters(remove_duplicate=False))
    for alias, target in aliases.items():
        if alias in params and target in params and params[alias] is not params[target]:
            mname, _, pname = alias.rpartition(".")
            setattr(model.get_submodule(mname) if mname else model, pname, params[target])


def _info(manifest: dict[str, Any], path: Path) -> ModelInfo:
    info = ModelInfo.from_manifest(manifest, f"{path}")
    if info.architecture is None:
        raise ArtifactError(f"{path}: manifest has no architecture; {RECREATE}")
    return info


def _given(model: ModelOrFactory) -> nn.Module:
    """The module ``model=`` stands for (a factory is called once)."""
    built = model if isinstance(model, nn.Module) or not callable(model) else model()
    if not isinstance(built, nn.Module):
        raise UserInputError(
            "model= must be an nn.Module or a zero-argument callable returning one, got"
            f" {type(built).__name__} (for a model spec such as 'pkg.mod:factory' pass"
            " slimtorch.models.load_model(spec).model)"
        )
    return built


def _architecture(
    arch: dict[str, Any], model: ModelOrFactory | None, trust_factory: bool
) -> nn.Module:
    if model is not None:
        return _given(model)
    return rebuild(arch, trust_factory=trust_factory)


def _runtime_modules(model: nn.Module, entries: Any, path: Path) -> None:
    for entry in entries or []:
        kind = entry.get("type") if isinstance(entry, dict) else None
        if kind not in RUNTIME_MODULES:
            raise ArtifactError(
                f"{path}: manifest 'modules' entry {str(entry)[:100]} names no runtime module of"
                f" this slimtorch ({', '.join(RUNTIME_MODULES)}); {RECREATE}"
            )
        cls = RUNTIME_MODULES.get(str(kind))
        try:
            module = cls.from_config(entry["config"])  # type: ignore[attr-defined]
            replace_module(model, str(entry["name"]), module)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ArtifactError(
                f"{path}: manifest 'modules' entry {str(entry)[:100]} does not fit ({exc!r});"
                f" {RECREATE}"
            ) from None


def load_artifact(
    path: str | Path,
    width: float | None = None,
    kernels: bool = False,
    model: ModelOrFactory | None = None,
    trust_factory: bool = False,
) -> nn.Module:
    """Rebuild the model saved at ``path``: no pickle, outputs identical to the saved model.

    ``width`` (0, 1] runs a ``prune.reorder``-ed model on its most important channels only;
    ``kernels`` runs weight-only quantized Linears on torch's int4 / int8 CPU kernels
    (:func:`~slimtorch.artifact.kernels.use_kernels`).
    ``model`` (an ``nn.Module``, filled in place, or a zero-argument factory) replaces rebuilding
    the recorded architecture: its weights are replaced by the artifact's. A ``factory``
    architecture without ``model`` needs ``trust_factory=True``: it then imports and calls the
    ``package.module:callable`` the manifest names.
    """
    path = Path(path)
    arch = _info(read_manifest(path), path).architecture or {}
    if arch.get("kind") == "factory" and model is None and not trust_factory:
        raise UserInputError(untrusted_factory_message(str(arch.get("ref"))))  # before decoding
    art = read_artifact(path)
    info = _info(art.manifest, path)
    net = _architecture(info.architecture or {}, model, trust_factory)
    _runtime_modules(net, art.manifest.get("modules"), path)
    apply_resized(net, art.manifest.get("resized", {}), art.tensors)
    missing, unexpected = net.load_state_dict(art.tensors, strict=False)
    if missing or unexpected:
        raise ArtifactError(
            f"{path}: artifact does not fit its architecture (missing {missing[:5]},"
            f" unexpected {unexpected[:5]}); re-create it with this slimtorch version"
        )
    _retie(net, art.manifest.get("aliases", {}))
    for name, state in art.states.items():
        mname, _, param = name.rpartition(".")
        set_state(net.get_submodule(mname) if mname else net, param, state)
    set_model_info(net, info)
    if width is not None and width != 1:
        net = narrow(net, width)
    if kernels:
        use_kernels(net)
    return net.eval()
