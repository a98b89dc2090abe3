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

Offloaded (``slimtorch compress --max-memory``): the rotation needs only ``Q`` (from the seed
and the width) and each piece's own weights, so :class:`RotateParts` applies it to each block
as it is read from the checkpoint and to the layers outside the blocks where the offloaded run
handles them, through the same functions (:mod:`slimtorch.quantize.rotate_llama`): the
artifact is the in-memory one. ``verify`` checks each block there (its output on 16 random
hidden states, rotated, against the rotated output), not the logits of the whole model.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from pydantic import Field
from torch import nn

from slimtorch.calibrate.sequential import Accumulator, DataFree
from slimtorch.core.config import StageConfig
from slimtorch.core.errors import ConfigError, UnsupportedModelError
from slimtorch.core.info import update_info
from slimtorch.core.methods import Run, register_method
from slimtorch.graph.weights import replace_module
from slimtorch.models.hf import hf_architecture
from slimtorch.quantize.rotate_llama import (
    Block,
    Rotation,
    block_parts,
    head_rotation,
    insert_online_block,
    llama_parts,
    make_rotation,
    online_records,
    outside_parts,
    rotate_block,
    rotate_model,
    rotate_outside,
    untie_head,
)
from slimtorch.quantize.rotation import RotationKind, max_abs_error, orthogonal
from slimtorch.runtime import OnlineHadamardLinear

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
        True,
        description="check that the logits on a few tokens did not change (rel. 1e-3);"
        " offloaded (--max-memory): each block's output on 16 random hidden states",
    )

    def online(self) -> tuple[str, ...]:
        """The projections that get an online Hadamard."""
        which: tuple[str, ...] = ("down_proj",) if self.online_hadamard else ()
        return which + (("o_proj",) if self.online_o_proj else ())


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(ids)
    return getattr(out, "logits", out)  # type: ignore[no-any-return]


def _limit(dtype: torch.dtype) -> float:
    return 1e-3 if dtype in (torch.float32, torch.float64) else 5e-2


def _no_targets(config: RotateConfig) -> None:
    if config.targets is not None or config.ignore:
        raise ConfigError(
            "quantize.rotate rotates the whole residual stream and takes no targets/ignore;"
            " remove them"
        )


@register_method(
    "quantize.rotate",
    RotateConfig,
    "QuaRot: fold RMSNorm scales and fuse Hadamard rotations into a Llama-family model (same"
    " function, no outlier channels) before 4-bit weights / activations",
    layerwise=lambda config, run: RotateParts(config),
)
def rotate(model: nn.Module, config: RotateConfig, run: Run) -> None:
    _no_targets(config)
    parts = llama_parts(model)
    embed = parts.embed.weight
    gen = torch.Generator().manual_seed(1234)
    ids = torch.randint(0, embed.shape[0], (1, VERIFY_TOKENS), generator=gen).to(embed.device)
    before = _logits(model, ids) if config.verify else None
    rotation = make_rotation(embed.shape[1], parts.blocks[0].head_dim, config.rotation,
                             config.seed, config.heads, config.online())  # fmt: skip
    untied, online = rotate_model(model, parts, rotation)
    if untied:  # the artifact must rebuild an untied head: record the changed config
        arch = hf_architecture(model)
        if arch is not None:
            update_info(model, architecture=arch)
    if before is not None:
        err = max_abs_error(before, _logits(model, ids))
        if not err <= _limit(embed.dtype):
            raise UnsupportedModelError(
                f"quantize.rotate changed this model's logits (relative error {err:.2e} >"
                f" {_limit(embed.dtype):g}): its blocks do not compute what a Llama block"
                " computes; leave it out of the recipe for this model"
            )
        log.info("quantize.rotate: logits unchanged to %.1e (relative)", err)
    log.info(
        "quantize.rotate: %s rotation of width %d over %d blocks (heads: %s, online: %d%s)",
        config.rotation, embed.shape[1], len(parts.blocks), config.heads, online,
        ", head untied" if untied else "",
    )  # fmt: skip


def _block_output(layer: nn.Module, h: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():  # a Llama-family block takes its rotary cos/sin from the model
        out = layer(h, position_embeddings=(angles.cos(), angles.sin()))
    return (out[0] if isinstance(out, (tuple, list)) else out).double()


class RotateParts(DataFree):
    """``quantize.rotate`` one part at a time (offloaded runs): :meth:`compress` rotates a
    block as the run reads it (before any calibrated stage sees it), ``fn(model)`` the layers
    outside the blocks (the run calls it on the model with its block list emptied, before it
    captures the first block's inputs and again when it writes those layers)."""

    def __init__(self, config: RotateConfig) -> None:
        _no_targets(config)
        super().__init__(self.outside)
        self.config = config
        self._q: dict[int, torch.Tensor] = {}

    def q(self, width: int) -> torch.Tensor:
        if width not in self._q:
            self._q[width] = orthogonal(width, self.config.rotation, self.config.seed)
        return self._q[width]

    def outside(self, model: nn.Module) -> None:
        parts = outside_parts(model)
        untie_head(model, parts)
        rotate_outside(parts, self.q(parts.embed.embedding_dim))

    def observe(self, name: str, block: nn.Module) -> dict[str, Accumulator]:
        return {}

    def compress(self, name: str, block: nn.Module, stats: dict[str, Accumulator]) -> None:
        parts = block_parts(block, name)
        width = parts.attn["q_proj"].in_features
        r = head_rotation(parts.head_dim) if self.config.heads else None
        rotation = Rotation(self.q(width), r, self.config.online())
        probe = self._probe(block, parts) if self.config.verify else None
        rotate_block(parts, rotation)
        insert_online_block(block, "", parts, rotation.online)
        if probe is not None:
            h, angles, before = probe
            after = _block_output(block, h @ rotation.q.to(h), angles)
            err = max_abs_error(before @ rotation.q.to(before), after)
            limit = _limit(h.dtype)
            if not err <= limit:
                raise UnsupportedModelError(
                    f"quantize.rotate changed the output of {name} (relative error {err:.2e} >"
                    f" {limit:g}): it does not compute what a Llama block computes; leave"
                    " quantize.rotate out of the recipe for this model"
                )

    def _probe(self, block: nn.Module, parts: Block) -> Any:
        """Random hidden states, rotary angles and the block's output on them, before; None
        (with a warning) when the block cannot be called alone with position embeddings."""
        weight = parts.attn["q_proj"].weight
        gen = torch.Generator().manual_seed(1234)
        width = parts.attn["q_proj"].in_features
        h = torch.randn(1, VERIFY_TOKENS, width, generator=gen).to(weight)
        angles = torch.rand(1, VERIFY_TOKENS, parts.head_dim, generator=gen).mul(6.3).to(weight)
        try:
            return h, angles, _block_output(block, h, angles)
        except TypeError as exc:
            log.warning("quantize.rotate: cannot verify %s alone (%s)", parts.name, exc)
            return None


def offloaded_modules(model: nn.Module, configs: list[Any]) -> list[dict[str, Any]]:
    """What an offloaded run of a recipe with ``quantize.rotate`` (``configs``: its stages'
    configs) must know up front, checked on ``model`` still on ``meta``: the structure fits
    (UnsupportedModelError otherwise), and the manifest's ``modules`` entries of the online
    Hadamards the rotation inserts into the blocks."""
    out: list[dict[str, Any]] = []
    for config in configs:
        if isinstance(config, RotateConfig):
            llama_parts(model, numeric=False)
            out += online_records(model, config.online())
    return out


def insert_online_meta(model: nn.Module, config: RotateConfig) -> None:
    """The online Hadamards the rotation inserts, put into ``model`` still on ``meta`` (the
    structure alone, from :func:`offloaded_modules`' records): what the offloaded run's
    manifest records."""
    for rec in offloaded_modules(model, [config]):
        m = int(rec["config"]["factor"])
        linear = model.get_submodule(rec["name"])
        hadamard = OnlineHadamardLinear(linear, torch.zeros(m, m, device="meta"))
        replace_module(model, rec["name"], hadamard)
