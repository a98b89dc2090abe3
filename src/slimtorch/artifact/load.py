"""A model from a slimtorch artifact, and the attributes that travel with a model into one.

``set_architecture`` records how to rebuild a model (see :func:`registry.rebuild`) and
``get_metadata`` what travels with it (source, recipe, evaluator, ...). :func:`load_artifact`
is what ``slimtorch.load`` runs, kept here so that techniques (distillation teachers) can load
artifacts without importing the API.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimtorch.core.errors import ArtifactError, UserInputError
from slimtorch.formats.artifact import read_artifact
from slimtorch.formats.state import set_state
from slimtorch.graph.dependency import DependencyGraph, Group, Member
from slimtorch.graph.surgery import RESIZED_ATTR, apply_channels
from slimtorch.graph.weights import replace_module
from slimtorch.models.registry import rebuild
from slimtorch.runtime import RUNTIME_MODULES

ARCH_ATTR = "_slimtorch_architecture"
WIDTHS_KEY = "widths"  # metadata: channel groups ordered by importance (prune.reorder)
WIDTH_STATS_KEY = "width_stats"  # metadata: BatchNorm statistics per trained width (slimmable)
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


_SIMPLE = (int, float, bool, str)


def _encode_attr(value: Any) -> Any:
    if isinstance(value, tuple) and all(isinstance(v, _SIMPLE) for v in value):
        return {"tuple": list(value)}
    if isinstance(value, list) and all(isinstance(v, _SIMPLE) for v in value):
        return list(value)
    return value if isinstance(value, _SIMPLE) or value is None else _SKIP


_SKIP = object()


def _decode_attr(value: Any) -> Any:
    return tuple(value["tuple"]) if isinstance(value, dict) else value


def resized_entries(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Plain attributes of every module structured pruning resized (and of its submodules),
    so that :func:`load_artifact` can give the rebuilt architecture the same shapes."""
    out: dict[str, dict[str, Any]] = {}
    names = set(model.__dict__.get(RESIZED_ATTR, set()))
    for name in sorted(names):
        try:
            root = model.get_submodule(name)
        except AttributeError:
            continue
        for sub, module in root.named_modules():
            full = f"{name}.{sub}" if sub and name else sub or name
            attrs = {}
            for key, value in vars(module).items():
                if key.startswith("_") or key == "training":
                    continue
                encoded = _encode_attr(value)
                if encoded is not _SKIP:
                    attrs[key] = encoded
            out[full] = attrs
    return out


def apply_resized(
    model: nn.Module, entries: dict[str, dict[str, Any]], tensors: dict[str, Any]
) -> None:
    """Give ``model`` the attributes and parameter shapes recorded by :func:`resized_entries`."""
    for name, attrs in entries.items():
        module = model.get_submodule(name) if name else model
        for key, value in attrs.items():
            setattr(module, key, _decode_attr(value))
        for pname, param in list(module.named_parameters(recurse=False)):
            stored = tensors.get(f"{name}.{pname}" if name else pname)
            if stored is not None and tuple(stored.shape) != tuple(param.shape):
                new = nn.Parameter(
                    torch.empty(stored.shape, dtype=param.dtype), requires_grad=param.requires_grad
                )
                setattr(module, pname, new)
        for bname, buf in list(module.named_buffers(recurse=False)):
            stored = tensors.get(f"{name}.{bname}" if name else bname)
            if stored is not None and buf is not None and tuple(stored.shape) != tuple(buf.shape):
                module._buffers[bname] = torch.empty(stored.shape, dtype=buf.dtype)
    model.__dict__[RESIZED_ATTR] = {n for n in entries}


def available_widths(model: nn.Module) -> bool:
    """Whether ``model`` was reordered by ``prune.reorder`` and can run narrower."""
    return bool(get_metadata(model).get(WIDTHS_KEY))


def width_key(width: float) -> str:
    """How a width names its entry in the metadata (``0.5`` -> ``"0.5"``)."""
    return f"{width:g}"


def _width_statistics(model: nn.Module, width: float) -> None:
    """Load the BatchNorm statistics ``train.slimmable`` recorded for ``width``, if any."""
    stats = get_metadata(model).pop(WIDTH_STATS_KEY, None) or {}
    for name, values in stats.get(width_key(width), {}).items():
        owner, _, leaf = name.rpartition(".")
        module = model.get_submodule(owner) if owner else model
        buf = module._buffers.get(leaf)
        value = torch.tensor(values, dtype=buf.dtype if buf is not None else torch.float32)
        if buf is None or buf.shape != value.shape:
            raise ArtifactError(
                f"the statistics recorded for width {width} do not fit {name}"
                f" ({tuple(value.shape)}); re-save the artifact"
            )
        module._buffers[leaf] = value


def narrow(model: nn.Module, width: float) -> nn.Module:
    """A copy of a ``prune.reorder``-ed model keeping the first ``width`` of every group's
    channels (the most important ones); ``width=1`` returns an unchanged copy."""
    groups_meta = get_metadata(model).get(WIDTHS_KEY)
    if not groups_meta:
        raise UserInputError(
            "this model has no width ordering: compress it with a recipe that ends with"
            " `prune.reorder` (see examples/recipes/*multiwidth*.yaml) to serve it at several widths"
        )
    if not 0 < width <= 1:
        raise UserInputError(f"width must be in (0, 1], got {width}")
    groups, keep = [], {}
    for i, g in enumerate(groups_meta):
        members = [
            Member(m, d, torch.tensor(index, dtype=torch.int64)) for m, d, index in g["members"]
        ]
        size, blocks = int(g["size"]), int(g["blocks"])
        groups.append(Group(i, size, members, blocks))
        count = max(1, round(size * width / blocks)) * blocks
        per = size // blocks
        keep[i] = torch.cat([torch.arange(count // blocks) + b * per for b in range(blocks)])
    out = copy.deepcopy(model)
    apply_channels(out, DependencyGraph(groups), keep)
    _width_statistics(out, width)
    meta = get_metadata(out)
    meta.pop(WIDTHS_KEY, None)
    meta["width"] = width
    return out


def use_int4_kernels(model: nn.Module) -> list[str]:
    """Swap every Linear holding 2-4-bit affine weights (no mask) for an
    :class:`~slimtorch.runtime.int4.Int4WeightOnlyLinear` running torch's int4 CPU kernel
    (bf16 activations: outputs within about 1e-2 relative of the dequantized model)."""
    from slimtorch.formats.state import clear_state, get_state
    from slimtorch.runtime.int4 import Int4WeightOnlyLinear

    swapped = []
    for name, module in list(model.named_modules()):
        state = get_state(module, "weight") if isinstance(module, nn.Linear) else None
        q = state.quant if state is not None else None
        if state is None or q is None or state.mask is not None:
            continue
        if q.scheme != "affine" or q.bits > 4 or q.granularity == "per_tensor":
            continue
        bias = module.bias.detach() if module.bias is not None else None
        clear_state(module, "weight")
        replace_module(model, name, Int4WeightOnlyLinear.from_state(q, bias))
        swapped.append(name)
    return swapped


def load_artifact(path: str | Path, width: float | None = None, kernels: bool = False) -> nn.Module:
    """Rebuild the model saved at ``path``: no pickle, outputs identical to the saved model.
    ``width`` (0, 1] runs a ``prune.reorder``-ed model on its most important channels only;
    ``kernels`` runs int4 weight-only Linears on the int4 CPU kernel (:func:`use_int4_kernels`)."""
    art = read_artifact(Path(path))
    arch = art.manifest.get("architecture")
    if not isinstance(arch, dict):
        raise ArtifactError(f"{path}: manifest has no architecture; re-create the artifact")
    model = rebuild(arch)
    for entry in art.manifest.get("modules", []):
        cls = RUNTIME_MODULES.get(entry["type"])
        replace_module(model, entry["name"], cls.from_config(entry["config"]))  # type: ignore[attr-defined]
    apply_resized(model, art.manifest.get("resized", {}), art.tensors)
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
    if width is not None and width != 1:
        model = narrow(model, width)
    if kernels:
        use_int4_kernels(model)
    return model.eval()
