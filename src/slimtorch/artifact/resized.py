"""The shapes structured pruning changed, as plain data in the manifest's ``resized`` key.

Structured pruning (``graph.surgery.apply_channels``) shrinks modules in place and records their
names on the model. :func:`resized_entries` turns those modules' plain attributes
(``in_features``, ``hidden_size``, ...) into JSON; :func:`apply_resized` gives a freshly rebuilt
architecture the same attributes and parameter shapes before the weights are loaded.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from slimtorch.core.errors import ArtifactError
from slimtorch.formats.artifact import RECREATE
from slimtorch.graph.surgery import RESIZED_ATTR

_SIMPLE = (int, float, bool, str)
_SKIP = object()


def encode_attr(value: Any) -> Any:
    """A module attribute as JSON (tuples as ``{"tuple": [...]}``), or ``_SKIP`` if not plain."""
    if isinstance(value, tuple) and all(isinstance(v, _SIMPLE) for v in value):
        return {"tuple": list(value)}
    if isinstance(value, list) and all(isinstance(v, _SIMPLE) for v in value):
        return list(value)
    return value if isinstance(value, _SIMPLE) or value is None else _SKIP


def decode_attr(value: Any) -> Any:
    """The inverse of :func:`encode_attr`; ``_SKIP`` for anything it never writes."""
    if isinstance(value, dict):
        items = value.get("tuple") if set(value) == {"tuple"} else None
        return tuple(items) if isinstance(items, list) and _plain_list(items) else _SKIP
    if isinstance(value, list):
        return value if _plain_list(value) else _SKIP
    return value if isinstance(value, _SIMPLE) or value is None else _SKIP


def _plain_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, _SIMPLE) for v in value)


def resized_entries(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Plain attributes of every module structured pruning resized (and of its submodules),
    so that :func:`apply_resized` can give the rebuilt architecture the same shapes."""
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
                encoded = encode_attr(value)
                if encoded is not _SKIP:
                    attrs[key] = encoded
            out[full] = attrs
    return out


def apply_resized(
    model: nn.Module, entries: dict[str, dict[str, Any]], tensors: dict[str, Any]
) -> None:
    """Give ``model`` the attributes and parameter shapes recorded by :func:`resized_entries`."""
    for name, attrs in entries.items():
        module = _module(model, name)
        for key, value in attrs.items():
            _set_attr(module, name, key, decode_attr(value))
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


def _set_attr(module: nn.Module, name: str, key: str, value: Any) -> None:
    """Set one recorded attribute; the manifest may only set plain public attributes."""
    try:
        if key.startswith("_") or key == "training" or value is _SKIP:
            raise TypeError("not a plain public attribute")
        setattr(module, key, value)
    except (TypeError, AttributeError) as exc:
        raise ArtifactError(
            f"manifest 'resized' entry {name[:100]!r} cannot set {key[:100]!r} ({exc}); {RECREATE}"
        ) from None


def _module(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name) if name else model
    except AttributeError:
        raise ArtifactError(
            f"manifest 'resized' names module {name[:100]!r}, which the architecture does not"
            f" have; {RECREATE}"
        ) from None
