"""Replace Linear/Conv2d layers by truncated-SVD factors (:func:`lowrank_model`), the work of the
``lowrank.svd`` recipe stage (:mod:`slimtorch.lowrank.stages`).

    - method: lowrank.svd
      rank_by: params          # or energy
      param_ratio: 0.5         # keep at most half of each layer's parameters
      targets: [Linear]
      whiten: false            # true: data-whitened SVD (SVD-LLM) on --data, see below
      finetune: {steps: 300}   # optional: fine-tune the factors on --data afterwards

A layer is skipped (and logged) when its rank would not reduce its parameters, when it is a
grouped convolution, or when it belongs to a MultiheadAttention (which reads ``out_proj.weight``
directly). Layers that already carry a pruning mask or quantization grid are refused: put
``lowrank.svd`` before ``prune.*``/``quantize.*`` stages, which then compress the factors.

Whitening: with ``whiten: true`` the stage first runs ``calibration.batches`` batches of the run's
task (--data) through the model, gathers each Linear's input Gram matrix, and factors ``W S``
instead of ``W`` (``S S^T`` = the Gram, see :mod:`slimtorch.lowrank.whiten`): the factors then
minimise the error of the layer's outputs on real inputs rather than of its weights. Conv2d
layers are factored by plain SVD.

Fine-tuning: with ``finetune`` set the stage trains the whole model on the run's task after
factoring (the same loop as ``train.finetune``); without it, add a ``train.finetune`` stage.
"""

from __future__ import annotations

import logging

from pydantic import Field
from torch import Tensor, nn

from slimtorch.calibrate.train import TrainOptions
from slimtorch.core.config import StageConfig, StrictModel
from slimtorch.core.context import Context
from slimtorch.core.errors import ConfigError, UnsupportedModelError
from slimtorch.core.methods import Task
from slimtorch.formats.state import get_state
from slimtorch.graph.weights import replace_module, select_weights
from slimtorch.lowrank.svd import (
    RankBy,
    choose_rank,
    energy_rank,
    reduces_params,
    truncated_svd,
)
from slimtorch.lowrank.whiten import input_grams, whitened_singular_values, whitened_svd
from slimtorch.runtime.lowrank import LowRankConv2d, LowRankLinear

log = logging.getLogger(__name__)

LOWRANK_TYPES = ("Linear", "Conv2d")


class CalibrationOptions(StrictModel):
    """How much of the task's data the whitening statistics are gathered on."""

    batches: int = Field(default=8, ge=1, description="forward batches of the run's task")
    batch_size: int = Field(default=16, ge=1)


class LowRankConfig(StageConfig):
    """Rank by ``energy`` (share of squared singular values kept) or ``params`` (budget)."""

    rank_by: RankBy = "params"
    energy: float = Field(default=0.9, gt=0, le=1, description="kept share of sum(sigma^2)")
    param_ratio: float = Field(default=0.5, gt=0, lt=1, description="kept share of parameters")
    whiten: bool = Field(
        default=False,
        description="factor W S, S S^T = the layer's input Gram on --data (SVD-LLM); needs data",
    )
    damp: float = Field(
        default=0.01, gt=0, le=1, description="whitening: added to diag(G), times its mean"
    )
    calibration: CalibrationOptions = Field(default_factory=CalibrationOptions)
    finetune: TrainOptions | None = None


def factorize(
    module: nn.Module,
    rank_by: RankBy,
    energy: float = 0.9,
    param_ratio: float = 0.5,
    gram: Tensor | None = None,
    damp: float = 0.01,
) -> nn.Module | None:
    """A low-rank replacement of ``module``, or None when no rank reduces its parameters.

    With ``gram`` (the input Gram matrix of a Linear) the factors are data-whitened.
    """
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
    if gram is not None and not isinstance(module, nn.Linear):
        raise UnsupportedModelError("whitened SVD factors nn.Linear only; drop `gram` for convs")
    if gram is not None and rank_by == "energy":
        rank = energy_rank(whitened_singular_values(w, gram, damp), energy)
    else:
        rank = choose_rank(w, rank_by, energy, param_ratio)
    rows, cols = w.shape
    if rank < 1 or not reduces_params(rows, cols, rank):
        return None
    a, b = whitened_svd(w, gram, rank, damp) if gram is not None else truncated_svd(w, rank)
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


def _candidates(model: nn.Module, config: LowRankConfig) -> dict[str, nn.Module]:
    """``{module name: module}`` of the selected layers that can be factored."""
    refs = select_weights(model, config.targets, config.ignore, LOWRANK_TYPES)
    out: dict[str, nn.Module] = {}
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
        out[ref.module_name] = ref.module
    return out


def _grams(
    model: nn.Module, layers: dict[str, nn.Module], config: LowRankConfig, task: Task, ctx: Context
) -> dict[str, Tensor]:
    linears = {n: m for n, m in layers.items() if type(m) is nn.Linear}
    if len(linears) < len(layers):
        log.info("lowrank.svd: whitening applies to Linear layers; Conv2d use plain SVD")
    cal = config.calibration
    return input_grams(model, linears, task, ctx, cal.batches, cal.batch_size)


def lowrank_model(
    model: nn.Module, config: LowRankConfig, task: Task | None = None, ctx: Context | None = None
) -> dict[str, int]:
    """Factor every selected layer of ``model`` in place; returns ``{name: rank}``.

    ``config.whiten`` needs ``task`` (calibration data) and uses ``ctx`` (default Context()).
    """
    if config.whiten and task is None:
        raise ConfigError(
            "lowrank.svd with `whiten: true` gathers input statistics: pass --data (data= in"
            " Python), or set `whiten: false`"
        )
    layers = _candidates(model, config)
    grams: dict[str, Tensor] = {}
    if config.whiten and task is not None and layers:
        grams = _grams(model, layers, config, task, ctx or Context(progress=False))
    ranks: dict[str, int] = {}
    before = after = 0
    for name, module in layers.items():
        gram = grams.pop(name, None)  # free each Gram matrix once used
        new = factorize(
            module, config.rank_by, config.energy, config.param_ratio, gram, config.damp
        )
        if new is None:
            log.info("lowrank.svd: skipping %s: no rank reduces its parameters", name)
            continue
        before += sum(p.numel() for p in module.parameters())
        after += sum(p.numel() for p in new.parameters())
        new.train(module.training)
        replace_module(model, name, new)
        ranks[name] = int(getattr(new, "rank"))  # noqa: B009
    if not ranks:
        log.warning("lowrank.svd factored no layer: every selected layer was skipped")
    else:
        log.info("lowrank.svd: %d layers, %d -> %d parameters", len(ranks), before, after)
    return ranks
