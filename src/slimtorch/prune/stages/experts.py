"""Recipe stage ``prune.experts``: remove whole experts of mixture-of-experts layers by
router-weighted saliency (REAP; the maths in :mod:`slimtorch.prune.experts`), with the router
resized, so that transformers reloads the result (``export --to hf``) with the same outputs.
``mode: merge`` folds each removed expert into the kept expert whose outputs on the calibration
tokens are most similar instead of discarding it (M-SMoE / HC-SMoE; the maths in
:mod:`slimtorch.prune.experts_merge`); the router loses the same rows either way.

Every MoE layer loses the same number of experts (a transformers config has one expert count).
The model's experts run as one Linear each (:mod:`slimtorch.runtime.moe`, done by
``slimtorch.compress`` before the first stage); the router is the sibling module ``gate`` (or
``router``, gpt-oss) whose parameters have one row per expert (Mixtral, Qwen2/3-MoE, OLMoE;
DeepSeek-V3's score bias, a router's bias too): all of them are cut to the kept experts.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from slimtorch.calibrate.sequential import CalibrationOptions, calibration_batches
from slimtorch.core.config import StageConfig
from slimtorch.core.errors import ConfigError, UnsupportedModelError
from slimtorch.core.info import model_info, update_info
from slimtorch.core.methods import Run, register_method
from slimtorch.prune.experts import SaliencySums, experts_to_keep
from slimtorch.prune.experts_merge import (
    OutputGram,
    check_mergeable,
    group_weights,
    merge_groups,
    merged_parameters,
)
from slimtorch.runtime.moe import UnfusedExperts

log = logging.getLogger(__name__)

# config keys holding the number of experts per layer, by model family
EXPERT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")
# the router's attribute name on the MoE block (Mixtral, Qwen, DeepSeek: gate; gpt-oss: router)
ROUTERS = ("gate", "router")


# merge mode runs every expert on every token, in chunks of at most CHUNK tokens and at most
# CHUNK_VALUES output values (experts x tokens x hidden) held at once
CHUNK, CHUNK_VALUES = 512, 2**25
# merge mode: the output cosine a kept expert needs with a removed one to take it in
MIN_SIMILARITY = 0.0


class ExpertPruneConfig(StageConfig):
    """Drop (or merge away) the least salient experts of every mixture-of-experts layer (same
    count each)."""

    fraction: float | None = Field(None, gt=0, lt=1, description="share of experts removed")
    count: int | None = Field(None, ge=1, description="experts removed per layer")
    criterion: Literal["reap", "frequency"] = Field(
        "reap", description="reap: mean router weight x output norm; frequency: routed tokens"
    )
    mode: Literal["drop", "merge"] = Field(
        "drop",
        description="drop: discard the removed experts; merge: average each into the kept"
        " expert with the most similar outputs (cosine over calibration tokens)",
    )
    merge_weights: Literal["frequency", "saliency", "uniform"] | None = Field(
        None,
        description="mode merge: each expert's share of the average (routed tokens, the"
        " criterion's saliency, or equal); default frequency",
    )
    min_similarity: float | None = Field(
        None,
        ge=-1,
        lt=1,
        description="mode merge: an expert whose most similar kept expert has output cosine"
        f" <= this is dropped, not merged; default {MIN_SIMILARITY}",
    )
    calibration: CalibrationOptions = Field(default_factory=CalibrationOptions)

    @model_validator(mode="after")
    def _one_amount(self) -> ExpertPruneConfig:
        if (self.fraction is None) == (self.count is None):
            raise ValueError("give exactly one of fraction (e.g. 0.25) or count (experts/layer)")
        for key in ("merge_weights", "min_similarity"):
            if getattr(self, key) is not None and self.mode != "merge":
                raise ValueError(f"{key} applies to mode: merge only (mode is 'drop')")
        return self


def _moe_layers(model: nn.Module) -> dict[str, tuple[UnfusedExperts, nn.Module]]:
    """``experts' name -> (experts, router)`` for every MoE layer of ``model``."""
    found = {}
    for name, module in model.named_modules():
        if not isinstance(module, UnfusedExperts):
            continue
        parent_name = name.rpartition(".")[0]
        parent = model.get_submodule(parent_name) if parent_name else model
        router = next(
            (r for key in ROUTERS if isinstance(r := getattr(parent, key, None), nn.Module)), None
        )
        weight = getattr(router, "weight", None)
        if router is None or not isinstance(weight, torch.Tensor):
            raise UnsupportedModelError(
                f"{name}: no router (`gate` or `router`) with a weight beside the experts;"
                " prune.experts knows Mixtral, Qwen2/3-MoE, OLMoE and DeepSeek-V3 style MoE blocks"
            )
        found[name] = (module, router)
    return found


class LayerStats:
    """One MoE layer's calibration statistics: saliency sums, and in merge mode the Gram matrix
    of every expert's outputs on every token."""

    def __init__(self, num_experts: int, merge: bool) -> None:
        self.sums = SaliencySums(num_experts)
        self.gram = OutputGram(num_experts) if merge else None

    def record(self, module: UnfusedExperts, args: tuple[torch.Tensor, ...]) -> None:
        if len(args) < 3:
            raise UnsupportedModelError(
                f"{type(module).__name__} was called without (hidden, top_k_index,"
                " top_k_weights): prune.experts reads the routing from those arguments"
            )
        hidden, index, weights = args[:3]
        experts = module.experts()
        if self.gram is None:
            for e, expert in enumerate(experts):
                tokens, slots = torch.where(index == e)
                if tokens.numel():
                    self.sums.add(e, weights[tokens, slots], expert(hidden[tokens]))
            return
        chunk = max(1, min(CHUNK, CHUNK_VALUES // (len(experts) * hidden.shape[-1])))
        for start in range(0, hidden.shape[0], chunk):
            part, idx = hidden[start : start + chunk], index[start : start + chunk]
            outputs = torch.stack([expert(part) for expert in experts])
            self.gram.add(outputs)
            for e in range(len(experts)):
                tokens, slots = torch.where(idx == e)
                if tokens.numel():
                    gate = weights[start : start + chunk][tokens, slots]
                    self.sums.add(e, gate, outputs[e, tokens])


def _statistics(
    model: nn.Module, layers: dict[str, Any], run: Run, config: ExpertPruneConfig
) -> dict[str, LayerStats]:
    stats = {n: LayerStats(e.num_experts, config.mode == "merge") for n, (e, _) in layers.items()}
    handles = [e.register_forward_pre_hook(stats[n].record) for n, (e, _) in layers.items()]
    task = run.require_task("prune.experts")
    try:
        with torch.no_grad():
            for batch in calibration_batches(run, config.calibration, "prune.experts"):
                task.forward(model, batch)
    finally:
        for h in handles:
            h.remove()
    return stats


def _merge_into_kept(
    experts: UnfusedExperts, stats: LayerStats, drop: int, config: ExpertPruneConfig
) -> list[int]:
    """Average each group's experts into its kept expert (in place); the kept indices."""
    assert stats.gram is not None
    saliency = stats.sums.saliency(config.criterion)
    cosine = stats.gram.cosine()
    threshold = MIN_SIMILARITY if config.min_similarity is None else config.min_similarity
    groups = merge_groups(saliency, cosine, drop, threshold)
    by = config.merge_weights or "frequency"
    weights = {
        "frequency": stats.sums.saliency("frequency"),
        "saliency": saliency,
        "uniform": torch.ones_like(saliency),
    }[by]
    mlps = experts.experts()
    with torch.no_grad():
        for kept, group in groups.items():
            if len(group) == 1:
                continue
            merged = merged_parameters([mlps[j] for j in group], group_weights(weights, group))
            params = dict(mlps[kept].named_parameters())
            for pname, value in merged.items():
                params[pname].copy_(value)
            sims = [round(float(cosine[kept, j]), 3) for j in group[1:]]
            log.info("prune.experts merge: %s -> %d (cosine %s, by %s)", group, kept, sims, by)
    dropped = sorted(set(range(experts.num_experts)) - {j for g in groups.values() for j in g})
    if dropped:
        log.info("prune.experts merge: %s dropped (no kept expert above %s)", dropped, threshold)
    return list(groups)


def _keep(experts: UnfusedExperts, router: nn.Module, kept: list[int]) -> UnfusedExperts:
    """A smaller :class:`UnfusedExperts` with the ``kept`` experts; the router's per-expert rows
    (every parameter/buffer whose first dimension is the expert count) cut to match."""
    new = experts.subset(kept)
    index = torch.tensor(kept)
    with torch.no_grad():
        for pname, tensor in [*router.named_parameters(), *router.named_buffers()]:
            if tensor.dim() >= 1 and tensor.shape[0] == experts.num_experts and "." not in pname:
                cut = tensor.index_select(0, index.to(tensor.device)).clone()
                if isinstance(tensor, nn.Parameter):
                    router._parameters[pname] = nn.Parameter(cut, tensor.requires_grad)
                else:
                    router._buffers[pname] = cut
    for attr in ("num_experts", "out_features"):  # a custom router's count, an nn.Linear's
        if isinstance(getattr(router, attr, None), int):
            setattr(router, attr, len(kept))
    return new


def _check_mergeable(layers: dict[str, tuple[UnfusedExperts, nn.Module]]) -> None:
    for name, (experts, _) in layers.items():
        for i, expert in enumerate(experts.experts()):
            try:
                check_mergeable(expert)
            except ValueError as exc:
                raise UnsupportedModelError(f"prune.experts mode merge, {name}.{i}: {exc}") from exc


def _check_top_k(model: nn.Module, experts: int) -> None:
    top_k = getattr(getattr(model, "config", None), "num_experts_per_tok", None)
    if isinstance(top_k, int) and experts < top_k:
        raise ConfigError(
            f"prune.experts would leave {experts} experts per layer but the router picks {top_k}"
            f" per token: keep at least {top_k} (a smaller count or fraction)"
        )


def _update_config(model: nn.Module, experts: int) -> None:
    config = getattr(model, "config", None)
    keys = [
        k for k in EXPERT_KEYS if config is not None and isinstance(getattr(config, k, None), int)
    ]
    for key in keys:
        setattr(config, key, experts)
    arch = model_info(model).architecture
    if arch and arch.get("kind") == "hf" and isinstance(arch.get("config"), dict):
        cfg = {**arch["config"], **{k: experts for k in keys if k in arch["config"]}}
        update_info(model, architecture={**arch, "config": cfg})


@register_method(
    "prune.experts",
    ExpertPruneConfig,
    "Expert pruning of mixture-of-experts layers by router-weighted saliency (REAP): drop the"
    " least salient experts or merge them into the most similar kept ones",
    needs_data=True,
    example={"fraction": 0.25, "calibration": {"samples": 2, "batch_size": 2}},
)
def prune_experts(model: nn.Module, config: ExpertPruneConfig, run: Run) -> None:
    layers = _moe_layers(model)
    if not layers:
        raise UnsupportedModelError(
            f"{type(model).__name__} has no mixture-of-experts layer: prune.experts applies to"
            " MoE models (Mixtral, Qwen2/3-MoE, ...); use prune.structured for dense MLPs"
        )
    counts = {e.num_experts for e, _ in layers.values()}
    if len(counts) != 1:
        raise UnsupportedModelError(f"MoE layers with different expert counts {sorted(counts)}")
    total = counts.pop()
    drop = config.count if config.count is not None else round(total * (config.fraction or 0))
    if not 1 <= drop < total:
        raise ConfigError(f"prune.experts: dropping {drop} of {total} experts; give 1..{total - 1}")
    _check_top_k(model, total - drop)
    if config.mode == "merge":
        _check_mergeable(layers)
    stats = _statistics(model, layers, run, config)
    for name, (experts, router) in layers.items():
        if config.mode == "merge":
            kept = _merge_into_kept(experts, stats[name], drop, config)
        else:
            kept = experts_to_keep(stats[name].sums.saliency(config.criterion), drop)
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        parent._modules[leaf] = _keep(experts, router, kept)
        if isinstance(getattr(parent, "num_experts", None), int):  # Llama 4's MoE block
            setattr(parent, "num_experts", len(kept))  # noqa: B010 (an int attribute)
        log.info("prune.experts %s (%s): kept %s", name, config.mode, kept)
    _update_config(model, total - drop)
