"""``share.tie``: repeated blocks share one weight tensor (cross-layer parameter sharing).

The blocks are the modules whose names match ``blocks`` (e.g. ``re:encoder\\.layer\\.\\d+``);
their parameters with the same relative name and shape become one ``nn.Parameter`` (the mean of
the tied tensors, or the first block's), the way ALBERT shares its Transformer layers. The
artifact stores a tied tensor once (as an alias) and ``slimtorch.load`` ties it again.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from slimtorch.core.config import StageConfig
from slimtorch.core.errors import ConfigError, TargetError
from slimtorch.core.methods import Run, register_method
from slimtorch.core.targets import Targets, describe_model
from slimtorch.formats.state import get_state

log = logging.getLogger(__name__)


class TieConfig(StageConfig):
    """Tie the same-named parameters of every block matching ``blocks``."""

    blocks: list[str] = Field(..., min_length=1, description="block modules: names or re:regex")
    reduce: Literal["mean", "first"] = "mean"
    params: list[str] | None = Field(
        None, description="relative parameter names to tie (default: every one the blocks share)"
    )


def tie_parameters(modules: list[nn.Module], names: list[str], reduce: str) -> int:
    """Make parameter ``name`` of every module in ``modules`` one shared Parameter; returns count."""
    tied = 0
    for rel in names:
        owners = []
        for block in modules:
            mod_name, _, pname = rel.rpartition(".")
            owner = block.get_submodule(mod_name) if mod_name else block
            owners.append((owner, pname))
        tensors = [getattr(o, p) for o, p in owners]
        with torch.no_grad():
            value = (
                torch.stack([t.detach() for t in tensors]).mean(0)
                if reduce == "mean"
                else tensors[0].detach()
            )
        shared = nn.Parameter(
            value.clone().to(tensors[0].dtype), requires_grad=tensors[0].requires_grad
        )
        for owner, pname in owners:
            setattr(owner, pname, shared)
        tied += 1
    return tied


def _blocks(model: nn.Module, patterns: list[str]) -> list[tuple[str, nn.Module]]:
    sel = Targets.of(patterns)
    found = [(n, m) for n, m in model.named_modules() if n and sel.selects(n, m)]
    outer = [(n, m) for n, m in found if not any(n.startswith(o + ".") for o, _ in found)]
    if len(outer) < 2:
        raise TargetError(
            f"share.tie: blocks {patterns} matched {len(outer)} module(s); at least two repeated"
            f" blocks are needed (model has: {describe_model(model)})"
        )
    return outer


@register_method("share.tie", TieConfig, "repeated blocks share one weight tensor (stored once)")
def tie(model: nn.Module, config: TieConfig, run: Run) -> None:
    blocks = _blocks(model, config.blocks)
    shapes: dict[str, set[tuple[int, ...]]] = defaultdict(set)
    counts: dict[str, int] = defaultdict(int)
    for _, block in blocks:
        for rel, p in block.named_parameters(remove_duplicate=False):
            shapes[rel].add(tuple(p.shape))
            counts[rel] += 1
    common = [r for r in shapes if counts[r] == len(blocks) and len(shapes[r]) == 1]
    names = common if config.params is None else list(config.params)
    missing = [n for n in names if n not in common]
    if missing or not names:
        raise ConfigError(
            f"share.tie: parameters {missing or names} are not present with one shape in every"
            f" block; tie-able: {sorted(common)[:10]}"
        )
    for _, block in blocks:
        for rel in names:
            mod_name, _, pname = rel.rpartition(".")
            owner = block.get_submodule(mod_name) if mod_name else block
            if get_state(owner, pname) is not None:
                raise ConfigError(
                    f"share.tie: {rel} already carries a compression state; tie before pruning,"
                    " quantizing or sharing"
                )
    count = tie_parameters([b for _, b in blocks], names, config.reduce)
    log.info("share.tie: %d parameters tied across %d blocks", count, len(blocks))
