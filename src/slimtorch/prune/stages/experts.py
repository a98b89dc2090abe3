"""Recipe stage ``prune.experts``: remove whole experts of mixture-of-experts layers by
router-weighted saliency (REAP; the maths in :mod:`slimtorch.prune.experts`), with the router
resized, so that transformers reloads the result (``export --to hf``) with the same outputs.

Every MoE layer loses the same number of experts (a transformers config has one expert count).
The model's experts run as one Linear each (:mod:`slimtorch.runtime.moe`, done by
``slimtorch.compress`` before the first stage); the router is the sibling module ``gate`` whose
parameters have one row per expert (Mixtral, Qwen2/3-MoE, OLMoE; DeepSeek-V3's score bias too).
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
from slimtorch.runtime.moe import UnfusedExperts

log = logging.getLogger(__name__)

# config keys holding the number of experts per layer, by model family
EXPERT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")


class ExpertPruneConfig(StageConfig):
    """Drop the least salient experts of every mixture-of-experts layer (same count each)."""

    fraction: float | None = Field(None, gt=0, lt=1, description="share of experts dropped")
    count: int | None = Field(None, ge=1, description="experts dropped per layer")
    criterion: Literal["reap", "frequency"] = Field(
        "reap", description="reap: mean router weight x output norm; frequency: routed tokens"
    )
    calibration: CalibrationOptions = Field(default_factory=CalibrationOptions)

    @model_validator(mode="after")
    def _one_amount(self) -> ExpertPruneConfig:
        if (self.fraction is None) == (self.count is None):
            raise ValueError("give exactly one of fraction (e.g. 0.25) or count (experts/layer)")
        return self


def _moe_layers(model: nn.Module) -> dict[str, tuple[UnfusedExperts, nn.Module]]:
    """``experts' name -> (experts, router)`` for every MoE layer of ``model``."""
    found = {}
    for name, module in model.named_modules():
        if not isinstance(module, UnfusedExperts):
            continue
        parent_name = name.rpartition(".")[0]
        parent = model.get_submodule(parent_name) if parent_name else model
        router = getattr(parent, "gate", None)
        weight = getattr(router, "weight", None)
        if not isinstance(router, nn.Module) or not isinstance(weight, torch.Tensor):
            raise UnsupportedModelError(
                f"{name}: no router `gate` with a weight beside the experts; prune.experts knows"
                " Mixtral, Qwen2/3-MoE, OLMoE and DeepSeek-V3 style MoE blocks"
            )
        found[name] = (module, router)
    return found


def _saliency(model: nn.Module, layers: dict[str, Any], run: Run, config: ExpertPruneConfig) -> Any:
    sums = {n: SaliencySums(e.num_experts) for n, (e, _) in layers.items()}

    def hook(name: str) -> Any:
        def record(module: UnfusedExperts, args: tuple[torch.Tensor, ...]) -> None:
            hidden, index, weights = args[:3]
            for e, expert in enumerate(module.experts()):
                tokens, slots = torch.where(index == e)
                if tokens.numel():
                    sums[name].add(e, weights[tokens, slots], expert(hidden[tokens]))

        return record

    handles = [e.register_forward_pre_hook(hook(n)) for n, (e, _) in layers.items()]
    task = run.require_task("prune.experts")
    try:
        with torch.no_grad():
            for batch in calibration_batches(run, config.calibration, "prune.experts"):
                task.forward(model, batch)
    finally:
        for h in handles:
            h.remove()
    return {n: s.saliency(config.criterion) for n, s in sums.items()}


def _keep(experts: UnfusedExperts, router: nn.Module, kept: list[int]) -> UnfusedExperts:
    """A smaller :class:`UnfusedExperts` with the ``kept`` experts; the router's per-expert rows
    (every parameter/buffer whose first dimension is the expert count) cut to match."""
    new = UnfusedExperts(len(kept), experts.hidden, experts.intermediate, experts.act)
    for i, j in enumerate(kept):
        new._modules[str(i)] = experts._modules[str(j)]
    index = torch.tensor(kept)
    with torch.no_grad():
        for pname, tensor in [*router.named_parameters(), *router.named_buffers()]:
            if tensor.dim() >= 1 and tensor.shape[0] == experts.num_experts and "." not in pname:
                cut = tensor.index_select(0, index.to(tensor.device)).clone()
                if isinstance(tensor, nn.Parameter):
                    router._parameters[pname] = nn.Parameter(cut, tensor.requires_grad)
                else:
                    router._buffers[pname] = cut
    if hasattr(router, "num_experts"):
        setattr(router, "num_experts", len(kept))  # noqa: B010 (an int attribute of a Module)
    return new


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
    "Expert pruning of mixture-of-experts layers by router-weighted saliency (REAP)",
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
    saliency = _saliency(model, layers, run, config)
    for name, (experts, router) in layers.items():
        kept = experts_to_keep(saliency[name], drop)
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        parent._modules[leaf] = _keep(experts, router, kept)
        log.info("prune.experts %s: kept %s", name, kept)
    _update_config(model, total - drop)
