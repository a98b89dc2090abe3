"""The recipe stage ``prune.hidden``: remove channels of a decoder LM's hidden (embedding) size,
Minitron-style, for real.

    - method: prune.hidden
      ratio: 0.15625           # share of the hidden channels removed (576 -> 486 on SmolLM2)
      importance: activation   # Minitron: mean |RMSNorm output| per channel on --data
      round_to: 1              # the kept count is also a multiple of the query head count

Importance ``activation`` sums, over every RMSNorm of the model (each block's two and the final
one), the mean |output| of each channel on ``calibration_batches`` batches of the run's data
(32 windows each); ``l2`` is the L2 norm of each channel's column of the token embedding (no
data). The lowest channels leave the embedding, the (tied) output head, every norm and every
projection that reads or writes the residual stream (:mod:`slimtorch.graph.hidden`); with
``rescale_norms`` the norms' weights and epsilon are rescaled so that the RMS over fewer
channels keeps its scale (exact for channels that are zero). The model's config gets the new
``hidden_size`` and its recorded architecture is refreshed, so ``slimtorch.save``/``load`` and
``export --to hf`` (transformers reload) see the narrower model. Combine with
``prune.structured`` (MLP channels, attention heads) and ``prune.layers`` in one recipe, and
recover with ``distill.finetune`` (the teacher is the model before the recipe).
"""

from __future__ import annotations

import logging
import math
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from slimtorch.calibrate.inputs import mean_abs_outputs
from slimtorch.core.config import StageConfig
from slimtorch.core.errors import ConfigError
from slimtorch.core.info import update_info
from slimtorch.core.methods import Run, register_method
from slimtorch.graph.hf_attention import find_attention
from slimtorch.graph.hidden import HiddenParts, find_hidden, hidden_keep, prune_hidden
from slimtorch.models.hf import hf_architecture
from slimtorch.prune.structured import keep_count

log = logging.getLogger(__name__)


class HiddenConfig(StageConfig):
    """Remove a share of the hidden (embedding) channels of a decoder LM (Minitron)."""

    ratio: float = Field(gt=0, lt=1, description="share of the hidden channels removed")
    importance: Literal["activation", "l2"] = Field(
        default="activation",
        description="activation: mean |RMSNorm output| on --data (Minitron); l2: embedding column",
    )
    round_to: int = Field(default=1, ge=1, description="keep a multiple of this many channels")
    rescale_norms: bool = Field(
        default=True, description="rescale RMSNorm weight/eps for the smaller width"
    )
    calibration_batches: int = Field(default=1, ge=1, description="32 windows each")


def hidden_scores(
    model: nn.Module, parts: HiddenParts, config: HiddenConfig, run: Run
) -> torch.Tensor:
    """One importance per hidden channel (higher = keep)."""
    if config.importance == "l2":
        embed = model.get_submodule(parts.embed)
        assert isinstance(embed, nn.Embedding)
        weight = embed.weight.detach().float()
        return weight.pow(2).sum(0).sqrt()
    if run.task is None:
        raise ConfigError(
            "prune.hidden (importance: activation) measures RMSNorm outputs on calibration text:"
            " pass --data (data= in Python), or use importance: l2"
        )
    found = mean_abs_outputs(model, parts.norms, run.task, run.ctx, config.calibration_batches)
    if not found:
        raise ConfigError("prune.hidden: the calibration data reached none of the RMSNorms")
    return torch.stack([v.float() for v in found.values()]).sum(0)


def head_counts(model: nn.Module) -> set[int]:
    """Query head counts of the model's attention modules and config: transformers refuses a
    config whose hidden_size is not a multiple of num_attention_heads."""
    counts = {p.num_heads for m in model.modules() if (p := find_attention(m)) is not None}
    heads = getattr(getattr(model, "config", None), "num_attention_heads", None)
    return counts | ({heads} if isinstance(heads, int) and heads > 0 else set())


@register_method(
    "prune.hidden",
    HiddenConfig,
    "width pruning of a decoder LM's hidden (embedding) size by RMSNorm activations (Minitron)",
    example={"ratio": 0.25},
)
def prune_hidden_stage(model: nn.Module, config: HiddenConfig, run: Run) -> None:
    parts = find_hidden(model)
    step = math.lcm(config.round_to, *head_counts(model))
    keep = keep_count(parts.size, config.ratio, 1, step, down=False)
    if keep >= parts.size:
        raise ConfigError(
            f"prune.hidden: ratio {config.ratio} keeps all {parts.size} channels in steps of"
            f" {step} (round_to {config.round_to}; a multiple of the attention head count,"
            " which transformers requires of hidden_size); raise the ratio or lower round_to"
        )
    params0 = sum(p.numel() for p in model.parameters())
    scores = hidden_scores(model, parts, config, run)
    prune_hidden(model, hidden_keep(scores, keep), config.rescale_norms, parts)
    arch = hf_architecture(model)
    if arch is not None:
        update_info(model, architecture=arch)
    params1 = sum(p.numel() for p in model.parameters())
    log.info(
        "prune.hidden: hidden size %d -> %d (%s), params %d -> %d",
        parts.size, keep, config.importance, params0, params1,
    )  # fmt: skip
