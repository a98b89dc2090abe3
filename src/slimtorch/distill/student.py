"""Smaller students from a teacher.

:func:`shrink_layers` removes blocks from the model's stack of layers (Hugging Face encoders and
decoders: ``encoder.layer``, ``model.layers``, ``h``...; in general the nn.ModuleList of
same-class blocks holding the most parameters). The kept blocks are the teacher's own modules,
so they keep their weights *and* their compression states (masks, quantization grids). The model's
config (``num_hidden_layers`` and per-layer lists such as ``layer_types``) is updated, and for
Hugging Face models the recorded architecture is refreshed so the saved artifact rebuilds the
smaller model.

The sentences a text-encoder student learns from are the ``sentences`` task
(:mod:`slimtorch.calibrate.sentences`); its names are re-exported here.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence

from torch import nn

from slimtorch.core.errors import ConfigError, UnsupportedModelError
from slimtorch.core.info import update_info
from slimtorch.distill.trainer import HiddenPair, get_module
from slimtorch.graph.surgery import keep_blocks
from slimtorch.models.hf import hf_architecture

__all__ = [
    "check_keep",
    "find_layer_list",
    "layer_pairs",
    "refresh_architecture",
    "shrink_layers",
]

log = logging.getLogger(__name__)


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def find_layer_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """``(name, list)`` of the model's stack of blocks: the largest uniform nn.ModuleList."""
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) < 2:
            continue
        if len({type(child) for child in module}) != 1:
            continue
        size = _numel(module)
        if best is None or size > best[0]:
            best = (size, name, module)
    if best is None:
        raise UnsupportedModelError(
            f"{type(model).__name__} has no nn.ModuleList of two or more same-class blocks to"
            " keep layers from; name the list with `layers` (its module name)"
        )
    return best[1], best[2]


def _layer_list(model: nn.Module, layers: str | None) -> tuple[str, nn.ModuleList]:
    if layers is None:
        return find_layer_list(model)
    module = get_module(model, layers, "model")
    if not isinstance(module, nn.ModuleList):
        raise ConfigError(
            f"`layers` {layers!r} is a {type(module).__name__}, not an nn.ModuleList of blocks"
        )
    return layers, module


def check_keep(keep: Sequence[int], count: int) -> list[int]:
    """``keep`` as a list: non-empty, strictly increasing, within ``0 .. count - 1``."""
    out = [int(i) for i in keep]
    if not out:
        raise ConfigError("`keep` is empty: give the indices of the layers to keep, e.g. [0, 2, 4]")
    bad = [i for i in out if not 0 <= i < count]
    if bad:
        raise ConfigError(f"layer indices {bad} out of range: the model has layers 0..{count - 1}")
    if any(b <= a for a, b in itertools.pairwise(out)):
        raise ConfigError(f"`keep` {out} must be strictly increasing (each layer once, in order)")
    return out


def refresh_architecture(model: nn.Module) -> None:
    """Record the model's current architecture so that its artifact rebuilds this shape."""
    arch = hf_architecture(model)
    if arch is not None:
        update_info(model, architecture=arch)
    else:
        log.warning(
            "%s is not a Hugging Face model: its recorded architecture still has every layer,"
            " so slimtorch.load cannot rebuild the shrunk model from the artifact",
            type(model).__name__,
        )


def shrink_layers(model: nn.Module, keep: Sequence[int], layers: str | None = None) -> nn.Module:
    """Keep only blocks ``keep`` of the model's layer list (``layers``: its name; None = find it).

    Works in place and returns ``model``. The kept blocks keep their weights and states.
    """
    name, blocks = _layer_list(model, layers)
    kept = check_keep(keep, len(blocks))
    keep_blocks(model, name, kept)  # renumbers layer_idx, cuts the config's layer count/lists
    refresh_architecture(model)
    before, after = len(blocks), len(kept)
    log.info("kept layers %s of %d in %r (%d -> %d)", kept, before, name, before, after)
    return model


def layer_pairs(
    layers: str, keep: Sequence[int], loss: str = "mse", weight: float = 1.0
) -> list[HiddenPair]:
    """Hidden-state pairs student ``layers.i`` <- teacher ``layers.keep[i]`` (after a shrink)."""
    return [
        HiddenPair(student=f"{layers}.{i}", teacher=f"{layers}.{k}", loss=loss, weight=weight)  # type: ignore[arg-type]
        for i, k in enumerate(keep)
    ]
