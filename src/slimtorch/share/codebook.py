"""``share.kmeans`` and ``share.finetune``: weight sharing through k-means codebooks.

Deep Compression (Han et al., 2016, section 3): the weights of a layer are clustered into
``2**bits`` centroids; each weight is stored as a ``bits``-bit index into the layer's codebook.
A pruned layer clusters only its kept weights and keeps its mask. With ``cross_layer: true``
the layers of one weight shape and bit width pool their weights into one codebook, which the
artifact stores once.

``share.finetune`` is trained weight sharing (section 3.3): during fine-tuning each weight is
read as ``codebook[index]`` (a parametrization), so autograd sums the gradients of all weights
that share a centroid into that centroid; the indices and the mask stay fixed.
"""

from __future__ import annotations

import logging
from collections import defaultdict

import torch
from pydantic import Field
from torch import nn
from torch.nn.utils import parametrize

from slimtorch.calibrate.train import TrainOptions, train
from slimtorch.core.config import StageConfig
from slimtorch.core.errors import ConfigError
from slimtorch.core.methods import Run, register_method
from slimtorch.core.targets import Targets
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
