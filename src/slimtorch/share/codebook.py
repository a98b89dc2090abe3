"""Weight sharing through k-means codebooks (the maths of ``share.kmeans`` and ``share.finetune``,
whose recipe stages are in :mod:`slimtorch.share.stages`).

Deep Compression (Han et al., 2016, section 3): the weights of a layer are clustered into
``2**bits`` centroids; each weight is stored as a ``bits``-bit index into the layer's codebook.
A pruned layer clusters only its kept weights and keeps its mask. With ``cross_layer: true``
the layers of one weight shape and bit width pool their weights into one codebook, which the
artifact stores once.

Trained weight sharing (section 3.3): during fine-tuning each weight is read as
``codebook[index]`` (:class:`SharedWeight`, a parametrization), so autograd sums the gradients of
all weights that share a centroid into that centroid; the indices and the mask stay fixed.
"""

from __future__ import annotations

import logging

import torch
from pydantic import Field
from torch import nn

from slimtorch.core.config import StageConfig
from slimtorch.core.errors import ConfigError
from slimtorch.core.targets import Targets
from slimtorch.formats.state import WeightState, apply_state, codebook_state, get_state
from slimtorch.graph.weights import WeightRef
from slimtorch.share.kmeans import Init, kmeans_1d

log = logging.getLogger(__name__)


class KMeansConfig(StageConfig):
    """Cluster each selected weight into ``2**bits`` shared values."""

    bits: int | dict[str, int] = Field(
        5,
        description="index bits: one number, or per target ({Conv2d: 8, Linear: 5}); the"
        " first key matching a layer (exact name before patterns) wins",
    )
    init: Init = Field("linear", description="linear (the paper's), density, kmeans++, cuberoot")
    max_iter: int = Field(100, ge=1, le=10_000)
    refine: bool = Field(True, description="merge/split moves after Lloyd (lower inertia)")
    cross_layer: bool = Field(
        False, description="layers of one shape and bit width share one codebook"
    )

    def bits_for(self, ref: WeightRef) -> int:
        if isinstance(self.bits, int):
            return _check_bits(self.bits, "bits")
        if ref.module_name in self.bits:
            return _check_bits(self.bits[ref.module_name], ref.module_name)
        for pattern, bits in self.bits.items():
            if Targets.matches(pattern, ref.module_name, ref.module):
                return _check_bits(bits, pattern)
        raise ConfigError(
            f"share.kmeans: no `bits` entry matches {ref.name} ({ref.kind}); add a key for it"
            f" (keys: {', '.join(self.bits)}) or exclude it with `ignore`"
        )


def _check_bits(bits: int, where: str) -> int:
    if not 1 <= bits <= 8:
        raise ConfigError(f"share.kmeans: bits for {where} must be in 1..8, got {bits}")
    return bits


def share_weights(refs: list[WeightRef], bits: int, config: KMeansConfig, seed: int) -> float:
    """Cluster ``refs`` (pooled) into one codebook of ``2**bits``; returns the inertia."""
    masks = []
    pooled = []
    for ref in refs:
        old = get_state(ref.module, ref.param)
        mask = old.mask if old is not None else None
        w = ref.weight.detach().to(torch.float32).reshape(-1)
        masks.append(mask)
        pooled.append(w[mask.reshape(-1)] if mask is not None else w)
    values = torch.cat(pooled)
    if values.numel() == 0:
        log.warning("share.kmeans: %s keep no weights; left as they are", [r.name for r in refs])
        return 0.0
    result = kmeans_1d(
        values, 2**bits, config.init, config.max_iter, seed=seed, refine=config.refine
    )
    codebook = result.centroids.to(torch.float32)
    labels = result.labels.to(torch.uint8).split([v.numel() for v in pooled])
    for ref, mask, kept in zip(refs, masks, labels):
        if mask is None:
            codes = kept.reshape(ref.weight.shape)
        else:  # pruned positions get code 0; the mask zeroes them
            codes = torch.zeros(ref.weight.shape, dtype=torch.uint8)
            codes[mask] = kept
        old = get_state(ref.module, ref.param)
        extra = dict(old.extra) if old is not None else {}
        state = WeightState(mask=mask, quant=codebook_state(codes, codebook, bits), extra=extra)
        apply_state(ref.module, ref.param, state)
    return float(result.inertia)


class SharedWeight(nn.Module):
    """Parametrization: the weight is ``codebook[codes]`` (times the mask); trains the codebook."""

    def __init__(self, codebook: nn.Parameter, codes: torch.Tensor, mask: torch.Tensor | None):
        super().__init__()
        self.codebook = codebook
        self.register_buffer("codes", codes.to(torch.int64), persistent=False)
        self.register_buffer(
            "mask", None if mask is None else mask.to(torch.bool), persistent=False
        )

    codes: torch.Tensor
    mask: torch.Tensor | None

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        out = self.codebook[self.codes].to(w.dtype)
        if self.mask is not None:
            out = out * self.mask.to(out.dtype)
        return out
