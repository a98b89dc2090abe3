"""The recipe stages of share: ``share.kmeans`` and ``share.finetune`` (k-means codebooks, then
trained centroids; :mod:`slimtorch.share.codebook`) and ``share.tie`` (repeated blocks share one
tensor; :mod:`slimtorch.share.tie`).

``share.finetune`` trains the codebooks of the weights ``share.kmeans`` shared: each weight reads
``codebook[index]`` while training, and the trained centroids become the new codebooks.
``share.tie`` ties the blocks whose names match ``blocks`` (e.g. ``re:encoder\\.layer\\.\\d+``).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Literal

import torch
from pydantic import Field
from torch import nn
from torch.nn.utils import parametrize

from slimtorch.calibrate.train import TrainOptions, train
from slimtorch.core.config import StageConfig
from slimtorch.core.errors import ConfigError, TargetError
from slimtorch.core.methods import Run, register_method
from slimtorch.core.targets import Targets, describe_model
from slimtorch.formats.state import (
    WeightState,
    apply_state,
    clear_state,
    codebook_state,
    get_state,
    iter_states,
    set_state,
)
from slimtorch.graph.weights import WeightRef, select_weights
from slimtorch.share.codebook import KMeansConfig, SharedWeight, share_weights
from slimtorch.share.tie import tie_parameters

log = logging.getLogger(__name__)


@register_method(
    "share.kmeans",
    KMeansConfig,
    "weight sharing: k-means codebook of 2^bits values per layer (kept weights only)",
)
def kmeans(model: nn.Module, config: KMeansConfig, run: Run) -> None:
    refs = select_weights(model, config.targets, config.ignore)
    groups: dict[tuple[int, str], list[WeightRef]] = defaultdict(list)
    for ref in refs:
        bits = config.bits_for(ref)
        key = str(tuple(ref.weight.shape)) if config.cross_layer else ref.name
        groups[(bits, key)].append(ref)
    items = run.ctx.progress_bar(list(groups.items()), "share.kmeans", len(groups))
    for (bits, _), group in items:
        share_weights(group, bits, config, run.ctx.seed)
    log.info("share.kmeans: %d weights in %d codebooks", len(refs), len(groups))


class ShareFinetuneConfig(StageConfig):
    """Fine-tune the shared centroids (and every weight that is not quantized) on --data."""

    train: TrainOptions = Field(default_factory=lambda: TrainOptions(steps=300, lr=1e-4))


_Attached = tuple[nn.Module, str, WeightState, SharedWeight]


def _attach(model: nn.Module, sel: Targets) -> list[_Attached]:
    params: dict[int, nn.Parameter] = {}
    attached: list[_Attached] = []
    for name, module, param, state in iter_states(model):
        q = state.quant
        if (
            q is None
            or q.scheme != "codebook"
            or q.codebook is None
            or not sel.selects(name, module)
        ):
            continue
        key = q.codebook.untyped_storage().data_ptr()
        if key not in params:
            params[key] = nn.Parameter(q.codebook.detach().clone().to(torch.float32))
        shared = SharedWeight(
            params[key], q.codes.reshape(getattr(module, param).shape), state.mask
        )
        clear_state(module, param)
        parametrize.register_parametrization(module, param, shared)
        getattr(module.parametrizations, param).original.requires_grad_(False)
        attached.append((module, param, state, shared))
    return attached


def _detach(attached: list[_Attached], keep_trained: bool) -> None:
    trained: dict[int, torch.Tensor] = {}
    for module, param, state, shared in attached:
        parametrize.remove_parametrizations(module, param, leave_parametrized=False)
        getattr(module, param).requires_grad_(True)
        q = state.quant
        assert q is not None
        if not keep_trained:
            set_state(module, param, state)
            continue
        key = id(shared.codebook)
        if key not in trained:
            trained[key] = shared.codebook.detach().clone()
        new = codebook_state(q.codes, trained[key], q.bits)
        apply_state(module, param, WeightState(mask=state.mask, quant=new, extra=dict(state.extra)))


@register_method(
    "share.finetune",
    ShareFinetuneConfig,
    "trained weight sharing: fine-tune codebook centroids (summed gradients) on --data",
    needs_data=True,
)
def finetune(model: nn.Module, config: ShareFinetuneConfig, run: Run) -> None:
    task = run.require_task("share.finetune")
    attached = _attach(model, Targets.of(config.targets, config.ignore))
    if not attached:
        raise ConfigError(
            "share.finetune: no weight-shared layer selected; put a share.kmeans stage before it"
        )
    try:
        losses = train(model, task, run.ctx, config.train)
    except BaseException:
        _detach(attached, keep_trained=False)
        raise
    _detach(attached, keep_trained=True)
    log.info("share.finetune: %d weights, loss %.4f -> %.4f", len(attached), losses[0], losses[-1])


class TieConfig(StageConfig):
    """Tie the same-named parameters of every block matching ``blocks``."""

    blocks: list[str] = Field(..., min_length=1, description="block modules: names or re:regex")
    reduce: Literal["mean", "first"] = "mean"
    params: list[str] | None = Field(
        None, description="relative parameter names to tie (default: every one the blocks share)"
    )


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


@register_method(
    "share.tie",
    TieConfig,
    "repeated blocks share one weight tensor (stored once)",
    example={"blocks": ["re:blocks\\.\\d+"]},
)
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
