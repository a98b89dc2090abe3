"""The ``lowrank.svd`` recipe stage: replace Linear/Conv2d layers by truncated-SVD factors.

    - method: lowrank.svd
      rank_by: params          # or energy
      param_ratio: 0.5         # keep at most half of each layer's parameters
      targets: [Linear]
      finetune: {steps: 300}   # optional: fine-tune the factors on --data afterwards

A layer is skipped (and logged) when its rank would not reduce its parameters, when it is a
grouped convolution, or when it belongs to a MultiheadAttention (which reads ``out_proj.weight``
directly). Layers that already carry a pruning mask or quantization grid are refused: put
``lowrank.svd`` before ``prune.*``/``quantize.*`` stages, which then compress the factors.

Fine-tuning: with ``finetune`` set the stage trains the whole model on the run's task after
factoring (the same loop as ``train.finetune``); without it, add a ``train.finetune`` stage.
"""

from __future__ import annotations

import logging

from pydantic import Field
from torch import nn

from slimtorch.calibrate.train import TrainOptions, train
from slimtorch.core.config import StageConfig
from slimtorch.core.errors import ConfigError, UnsupportedModelError
from slimtorch.core.methods import Run, register_method
from slimtorch.formats.state import get_state
from slimtorch.graph.weights import replace_module, select_weights
from slimtorch.lowrank.svd import RankBy, choose_rank, reduces_params, truncated_svd
from slimtorch.runtime.lowrank import LowRankConv2d, LowRankLinear

log = logging.getLogger(__name__)

LOWRANK_TYPES = ("Linear", "Conv2d")


class LowRankConfig(StageConfig):
    """Rank by ``energy`` (share of squared singular values kept) or ``params`` (budget)."""

    rank_by: RankBy = "params"
    energy: float = Field(default=0.9, gt=0, le=1, description="kept share of sum(sigma^2)")
    param_ratio: float = Field(default=0.5, gt=0, lt=1, description="kept share of parameters")
    finetune: TrainOptions | None = None


def factorize(
    module: nn.Module, rank_by: RankBy, energy: float = 0.9, param_ratio: float = 0.5
) -> nn.Module | None:
    """A low-rank replacement of ``module``, or None when no rank reduces its parameters."""
    if type(module) is nn.Linear:
        w = module.weight.detach()
    elif type(module) is nn.Conv2d:
        if module.groups != 1:
            return None
        w = module.weight.detach().reshape(module.out_channels, -1)
    else:
        raise UnsupportedModelError(
            f"lowrank.svd factors nn.Linear and nn.Conv2d, not {type(module).__name__};"
            " choose `targets` among those layers"
        )
    rank = choose_rank(w, rank_by, energy, param_ratio)
    rows, cols = w.shape
    if rank < 1 or not reduces_params(rows, cols, rank):
        return None
    a, b = truncated_svd(w, rank)
    if isinstance(module, nn.Conv2d):
        return LowRankConv2d.from_conv(module, a, b)
    bias = module.bias.detach() if module.bias is not None else None
    return LowRankLinear.from_factors(a, b, bias)


def _skip_reason(model: nn.Module, name: str) -> str | None:
    parent_name = name.rpartition(".")[0]
    parent = model.get_submodule(parent_name) if name and "." in name else model
    if isinstance(parent, nn.MultiheadAttention):
        return "it is the out_proj of a MultiheadAttention"
    if isinstance(parent, (LowRankLinear, LowRankConv2d)):
        return "it is already a low-rank factor"
    return None


def lowrank_model(model: nn.Module, config: LowRankConfig) -> dict[str, int]:
    """Factor every selected layer of ``model`` in place; returns ``{name: rank}``."""
    refs = select_weights(model, config.targets, config.ignore, LOWRANK_TYPES)
    ranks: dict[str, int] = {}
    before = after = 0
    for ref in refs:
        reason = _skip_reason(model, ref.module_name)
        if reason:
            log.info("lowrank.svd: skipping %s: %s", ref.module_name, reason)
            continue
        state = get_state(ref.module, "weight")
        if state is not None and (state.mask is not None or state.quant is not None):
            raise ConfigError(
                f"{ref.module_name!r} is already pruned or quantized; put lowrank.svd before"
                " prune.* and quantize.* stages (they then compress the factors)"
            )
        new = factorize(ref.module, config.rank_by, config.energy, config.param_ratio)
        if new is None:
            log.info("lowrank.svd: skipping %s: no rank reduces its parameters", ref.name)
            continue
        before += sum(p.numel() for p in ref.module.parameters())
        after += sum(p.numel() for p in new.parameters())
        new.train(ref.module.training)
        replace_module(model, ref.module_name, new)
        ranks[ref.module_name] = int(getattr(new, "rank"))  # noqa: B009
    if not ranks:
        log.warning("lowrank.svd factored no layer: every selected layer was skipped")
    else:
        log.info("lowrank.svd: %d layers, %d -> %d parameters", len(ranks), before, after)
    return ranks


@register_method(
    "lowrank.svd",
    LowRankConfig,
    "factor Linear/Conv2d weights by truncated SVD (optionally fine-tune)",
)
def lowrank_svd(model: nn.Module, config: LowRankConfig, run: Run) -> None:
    task = run.require_task("lowrank.svd (with finetune)") if config.finetune else None
    lowrank_model(model, config)
    if task is not None and config.finetune is not None:
        losses = train(model, task, run.ctx, config.finetune)
        log.info(
            "lowrank.svd fine-tuned %d steps: loss %.4f -> %.4f", len(losses), losses[0], losses[-1]
        )
