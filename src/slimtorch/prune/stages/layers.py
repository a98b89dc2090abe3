"""The recipe stage ``prune.layers``: depth pruning, whole decoder blocks removed (ShortGPT).

    - method: prune.layers
      fraction: 0.2            # or count: 6, or blocks: [20, 21, 22] (no data needed)
      criterion: influence     # influence | loss | kld
      calibration: {samples: 32, batch_size: 4}

The blocks are the model's stack of repeated layers (the decoder layers of a Hugging Face LLM:
:func:`slimtorch.calibrate.sequential.find_blocks`, or ``layers``: the nn.ModuleList's name).
Each block is scored on calibration batches (:mod:`slimtorch.prune.layers`): ``influence`` is
ShortGPT's block influence (1 - cosine between the hidden states entering and leaving it, one
forward pass); ``loss`` and ``kld`` drop each block alone and measure the task loss (perplexity)
or the next-token KL divergence from the full model (one forward pass per block). The lowest
scored blocks go. The model's config (layer count, ``layer_types``) and every attention
module's ``layer_idx`` follow, and a Hugging Face model's recorded architecture is refreshed, so
``slimtorch.save``/``load``, ``export --to hf`` and ``--to gguf`` see the shallower model.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from slimtorch.calibrate.lm import logits_of
from slimtorch.calibrate.sequential import CalibrationOptions, calibration_batches, find_blocks
from slimtorch.core.config import StageConfig
from slimtorch.core.errors import ConfigError, UnsupportedModelError
from slimtorch.core.info import model_info, update_info
from slimtorch.core.methods import Run, Task, register_method
from slimtorch.graph.surgery import keep_blocks
from slimtorch.models.hf import hf_architecture
from slimtorch.prune.layers import InfluenceSum, check_blocks, drop_count, lowest, next_token_kld

log = logging.getLogger(__name__)


class LayersConfig(StageConfig):
    """Depth pruning: remove whole blocks (decoder layers), the least important first."""

    fraction: float | None = Field(None, gt=0, lt=1, description="share of the blocks to drop")
    count: int | None = Field(None, ge=1, description="number of blocks to drop")
    blocks: list[int] | None = Field(None, description="drop exactly these blocks (no data)")
    criterion: Literal["influence", "loss", "kld"] = "influence"
    layers: str | None = Field(None, description="the nn.ModuleList of blocks (default: found)")
    calibration: CalibrationOptions = Field(
        default_factory=lambda: CalibrationOptions(samples=32, batch_size=4)
    )

    @model_validator(mode="after")
    def _one_amount(self) -> LayersConfig:
        given = [k for k in ("fraction", "count", "blocks") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                "give exactly one of fraction (e.g. 0.2), count (e.g. 6) or blocks (e.g. [20, 21]);"
                f" got {given or 'none'}"
            )
        if self.targets is not None or self.ignore:
            raise ValueError("prune.layers removes whole blocks: use `layers`, not targets/ignore")
        return self


def block_list(model: nn.Module, name: str | None) -> tuple[str, nn.ModuleList]:
    """``(name, list)`` of the blocks to prune, or an error saying the model has none."""
    if name is None:
        found = find_blocks(model)
        if found.container == "":
            raise UnsupportedModelError(
                f"{type(model).__name__} has no stack of repeated blocks (an nn.ModuleList of"
                " same-class layers holding Linear layers, such as a decoder's layers): depth"
                " pruning does not apply; name the list with `layers` if it has another form"
            )
        name = found.container
    try:
        module = model.get_submodule(name)
    except AttributeError:
        raise ConfigError(f"`layers` {name!r} is not a module of {type(model).__name__}") from None
    if not isinstance(module, nn.ModuleList) or len(module) < 2:
        raise ConfigError(f"`layers` {name!r} must be an nn.ModuleList of two or more blocks")
    return name, module


def _hidden(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    x = args[0] if args else kwargs.get("hidden_states")
    if not isinstance(x, torch.Tensor):
        raise UnsupportedModelError("a block's first input is not its hidden-state tensor")
    return x


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


@contextmanager
def _hooks(blocks: nn.ModuleList, make: Callable[[int], Any]) -> Iterator[None]:
    handles = [b.register_forward_hook(make(i), with_kwargs=True) for i, b in enumerate(blocks)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _skip(output: Any, x: torch.Tensor) -> Any:
    """``output`` with its hidden states replaced by the block's input: the block is skipped."""
    if isinstance(output, tuple):
        return (x, *output[1:])
    return x


def influence_scores(
    model: nn.Module, blocks: nn.ModuleList, task: Task, batches: list[Any]
) -> list[float]:
    """Block influence of every block, on ``batches`` (one forward pass each)."""
    sums = [InfluenceSum() for _ in blocks]

    def make(i: int) -> Any:
        def hook(_m: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
            sums[i].update(_hidden(args, kwargs).detach(), _first(output).detach())

        return hook

    with _hooks(blocks, make):
        for batch in batches:
            task.forward(model, batch)
    return [s.mean() for s in sums]


def drop_costs(
    model: nn.Module, blocks: nn.ModuleList, task: Task, batches: list[Any], kld: bool
) -> list[float]:
    """What dropping each block alone costs: the task loss's rise, or the mean next-token KL
    divergence from the full model (``kld``); one forward pass per block and batch."""
    skipped: list[int | None] = [None]

    def make(i: int) -> Any:
        def hook(_m: nn.Module, args: Any, kwargs: Any, output: Any) -> Any:
            return _skip(output, _hidden(args, kwargs)) if skipped[0] == i else None

        return hook

    costs = [0.0] * len(blocks)
    with _hooks(blocks, make):
        for batch in batches:
            skipped[0] = None
            base = logits_of(task.forward(model, batch)) if kld else float(task.loss(model, batch))
            for i in range(len(blocks)):
                skipped[0] = i
                if kld:
                    assert isinstance(base, torch.Tensor)
                    costs[i] += float(next_token_kld(base, logits_of(task.forward(model, batch))))
                else:
                    costs[i] += float(task.loss(model, batch)) - float(base)
    return [c / max(1, len(batches)) for c in costs]


def block_scores(
    model: nn.Module, blocks: nn.ModuleList, config: LayersConfig, run: Run
) -> list[float]:
    """Every block's score under ``config.criterion`` (higher = keep), in eval mode, no cache."""
    task = run.require_task(f"prune.layers (criterion: {config.criterion})")
    batches = calibration_batches(run, config.calibration, "prune.layers")
    cfg = getattr(model, "config", None)
    cached = getattr(cfg, "use_cache", None)
    was_training = model.training
    if cached:
        cfg.use_cache = False  # type: ignore[union-attr]
    model.eval()
    try:
        with torch.no_grad():
            if config.criterion == "influence":
                return influence_scores(model, blocks, task, batches)
            return drop_costs(model, blocks, task, batches, kld=config.criterion == "kld")
    finally:
        model.train(was_training)
        if cached:
            cfg.use_cache = cached  # type: ignore[union-attr]


def remove_blocks(model: nn.Module, container: str, drop: list[int]) -> list[int]:
    """Remove blocks ``drop`` of ``container``; returns the kept (original) indices and records
    them (composed with any earlier removal) and the new architecture in the model's info."""
    total = len(block_list(model, container)[1])
    keep = [i for i in range(total) if i not in set(drop)]
    keep_blocks(model, container, keep)
    earlier = model_info(model).kept_layers
    kept = [earlier[i] for i in keep] if earlier and len(earlier) == total else keep
    update_info(model, kept_layers=kept)
    arch = hf_architecture(model)
    if arch is not None:
        update_info(model, architecture=arch)
    else:
        log.warning(
            "%s is not a Hugging Face model: its recorded architecture still has %d blocks, so"
            " slimtorch.load rebuilds the model only from a model=... with %d blocks",
            type(model).__name__, total, len(keep),
        )  # fmt: skip
    return keep


@register_method(
    "prune.layers",
    LayersConfig,
    "depth pruning: remove whole decoder blocks by block influence or drop cost (ShortGPT)",
    needs_data=True,
    example={"count": 1},
)
def prune_layers(model: nn.Module, config: LayersConfig, run: Run) -> None:
    container, blocks = block_list(model, config.layers)
    total = len(blocks)
    if config.blocks is not None:
        drop = check_blocks(config.blocks, total)
    else:
        n = drop_count(total, config.fraction, config.count)
        scores = block_scores(model, blocks, config, run)
        log.info("prune.layers %s: %s", config.criterion, ", ".join(f"{s:.4g}" for s in scores))
        drop = lowest(scores, n)
    keep = remove_blocks(model, container, drop)
    log.info("prune.layers: dropped blocks %s of %d in %r (%d kept)", drop, total, container,
             len(keep))  # fmt: skip
