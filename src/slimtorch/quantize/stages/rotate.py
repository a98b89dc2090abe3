"""``quantize.rotate``: QuaRot-style orthogonal rotations fused into a Llama-family model.

The model computes the same function afterwards (checked on a few tokens, ``verify``), but its
residual stream, values and (with ``online_hadamard``) down_proj inputs carry no outlier
channels: the weights and the per-token activations that later stages quantize
(``quantize.gptq`` / ``quantize.rtn``; ``quantize.activations`` or ``quantize.dynamic_int8``)
lose less. Put it first in a recipe: it refuses layers that are already quantized.

Without the online transforms the result is still a plain Llama (unit norm weights, an untied
LM head) that exports anywhere; ``online_hadamard`` adds
:class:`~slimtorch.runtime.hadamard.OnlineHadamardLinear` wrappers that slimtorch's artifact
saves and loads (other runtimes do not know them).
"""

from __future__ import annotations

import logging

import torch
from pydantic import Field
from torch import nn

from slimtorch.core.config import StageConfig
from slimtorch.core.errors import ConfigError, UnsupportedModelError
from slimtorch.core.info import update_info
from slimtorch.core.methods import Run, register_method
from slimtorch.models.hf import hf_architecture
from slimtorch.quantize.rotate_llama import (
    fold_norms,
    head_rotation,
    insert_online,
    llama_parts,
    rotate_heads,
    rotate_residual,
    untie_head,
)
from slimtorch.quantize.rotation import RotationKind, max_abs_error, orthogonal

log = logging.getLogger(__name__)

VERIFY_TOKENS = 16


class RotateConfig(StageConfig):
    """Fused orthogonal rotations of a Llama-family decoder (QuaRot); the function is kept."""

    rotation: RotationKind = Field(
        "hadamard",
        description="residual rotation: 'hadamard' (randomized Hadamard diag(s) H / sqrt(n),"
        " seeded signs; n = m * 2^k with a Paley m) or 'random' (seeded random orthogonal)",
    )
    seed: int = Field(0, ge=0, description="seed of the random signs / random matrix")
    heads: bool = Field(True, description="also rotate each value head and o_proj's inputs")
    online_hadamard: bool = Field(
        False,
        description="a Hadamard transform of down_proj's input at run time (its weight W H):"
        " what 4-bit activations need; the model then loads in slimtorch only",
    )
    online_o_proj: bool = Field(
        False, description="the same online Hadamard before o_proj (across all heads)"
    )
    verify: bool = Field(
        True, description="check that the logits on a few tokens did not change (rel. 1e-3)"
    )


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(ids)
    return getattr(out, "logits", out)  # type: ignore[no-any-return]


@register_method(
    "quantize.rotate",
    RotateConfig,
    "QuaRot: fold RMSNorm scales and fuse Hadamard rotations into a Llama-family model (same"
    " function, no outlier channels) before 4-bit weights / activations",
)
def rotate(model: nn.Module, config: RotateConfig, run: Run) -> None:
    if config.targets is not None or config.ignore:
        raise ConfigError(
            "quantize.rotate rotates the whole residual stream and takes no targets/ignore;"
            " remove them"
        )
    parts = llama_parts(model)
    embed = parts.embed.weight
    gen = torch.Generator().manual_seed(1234)
    ids = torch.randint(0, embed.shape[0], (1, VERIFY_TOKENS), generator=gen).to(embed.device)
    before = _logits(model, ids) if config.verify else None
    untied = untie_head(model, parts)
    fold_norms(parts)
    q = orthogonal(embed.shape[1], config.rotation, config.seed)
    rotate_residual(parts, q)
    if config.heads:
        rotate_heads(parts, head_rotation(parts.head_dim))
    which: tuple[str, ...] = ("down_proj",) if config.online_hadamard else ()
    which += ("o_proj",) if config.online_o_proj else ()
    online = insert_online(model, parts, which)
    if untied:  # the artifact must rebuild an untied head: record the changed config
        arch = hf_architecture(model)
        if arch is not None:
            update_info(model, architecture=arch)
    if before is not None:
        after = _logits(model, ids)
        err = max_abs_error(before, after)
        dtype = embed.dtype
        limit = 1e-3 if dtype in (torch.float32, torch.float64) else 5e-2
        if not err <= limit:
            raise UnsupportedModelError(
                f"quantize.rotate changed this model's logits (relative error {err:.2e} >"
                f" {limit:g}): its blocks do not compute what a Llama block computes; leave it"
                " out of the recipe for this model"
            )
        log.info("quantize.rotate: logits unchanged to %.1e (relative)", err)
    log.info(
        "quantize.rotate: %s rotation of width %d over %d blocks (heads: %s, online: %d%s)",
        config.rotation, embed.shape[1], len(parts.blocks), config.heads, online,
        ", head untied" if untied else "",
    )  # fmt: skip
