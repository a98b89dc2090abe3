"""Recipe stages ``prune.sparsegpt`` and ``prune.wanda``: one-shot LLM pruning, block by block.

SparseGPT (Frantar & Alistarh, 2023) prunes each Linear with its input Hessian and updates the
remaining weights to compensate; Wanda (Sun et al., 2024) keeps the weights with the largest
``|W| * ||x||`` per output row, no update. Both do unstructured sparsity or N:M (``n``/``m``).
``owl: true`` gives Wanda per-block sparsities from the outlier distribution of the dense
model (OWL, Yin et al., 2024): blocks with more outliers are pruned less, same mean.
"""

from __future__ import annotations

import logging

import torch
from pydantic import Field, model_validator
from torch import nn

from slimtorch.calibrate.per_layer import PerLayerCompressor
from slimtorch.calibrate.sequential import (
    Accumulator,
    LayerwiseConfig,
    calibration_batches,
    matrix_weight,
    run_layerwise,
    run_sequential,
)
from slimtorch.calibrate.statistics import HessianAccumulator, InputNormAccumulator
from slimtorch.core.errors import ConfigError
from slimtorch.core.methods import Run, register_method
from slimtorch.formats.state import from_matrix, get_state, to_matrix
from slimtorch.graph.weights import WeightRef
from slimtorch.prune.masking import set_mask
from slimtorch.prune.sparsegpt import sparsegpt_prune
from slimtorch.prune.wanda import outlier_ratio, owl_sparsities, wanda_mask

log = logging.getLogger(__name__)


class _OneShotConfig(LayerwiseConfig):
    sparsity: float = Field(0.5, ge=0, lt=1, description="unstructured sparsity per layer")
    n: int = Field(0, ge=0, description="N of N:M (0: unstructured)")
    m: int = Field(0, ge=0, description="M of N:M")

    @model_validator(mode="after")
    def _nm(self) -> _OneShotConfig:
        if (self.n == 0) != (self.m == 0) or (self.m and self.n >= self.m):
            raise ValueError(
                f"set both n < m for N:M sparsity (e.g. n: 2, m: 4); got {self.n}:{self.m}"
            )
        return self


class SparseGPTConfig(_OneShotConfig):
    """SparseGPT: Hessian-aware pruning with weight updates."""

    block_size: int = Field(128, ge=1)
    damp: float = Field(0.01, gt=0, le=1)


class WandaConfig(_OneShotConfig):
    """Wanda: prune by |W| times the input norm; ``owl`` for outlier-weighted block sparsity."""

    owl: bool = False
    owl_lambda: float = Field(0.08, ge=0, lt=0.5, description="largest deviation from target")
    owl_threshold: float = Field(5.0, gt=0, description="outlier = score > M * mean score")


def _prior(layer: nn.Module, param: str) -> torch.Tensor | None:
    state = get_state(layer, param)
    return None if state is None or state.mask is None else state.mask


def _full(block: str, key: str) -> str:
    rel = key.partition(":")[0]
    return f"{block}.{rel}" if block and rel else block or rel


class SparseGPTCompressor(PerLayerCompressor):
    stage, fallback = "prune.sparsegpt", "magnitude"
    config: SparseGPTConfig

    def accumulator(self, columns: int) -> Accumulator:
        return HessianAccumulator(columns)

    def compress_layer(
        self, block_name: str, key: str, layer: nn.Module, param: str, acc: Accumulator
    ) -> None:
        c = self.config
        assert isinstance(acc, HessianAccumulator)
        weight = matrix_weight(layer, param)
        prior = _prior(layer, param)
        shape = weight.shape
        w, keep = sparsegpt_prune(
            to_matrix(weight.detach()), acc.hessian(), c.sparsity, n=c.n, m=c.m,
            block_size=c.block_size, damp=c.damp,
            prior=None if prior is None else to_matrix(prior),
        )  # fmt: skip
        with torch.no_grad():
            weight.copy_(from_matrix(w, shape))
        set_mask(WeightRef(_full(block_name, key), layer, param), from_matrix(keep, shape))


class WandaCompressor(PerLayerCompressor):
    stage, fallback = "prune.wanda", "magnitude"
    config: WandaConfig

    def __init__(
        self,
        config: WandaConfig,
        sparsities: dict[str, float] | None = None,
        data_free: list[str] | None = None,
    ) -> None:
        super().__init__(config, data_free)
        self.sparsities = sparsities or {}
        self.ratios: dict[str, float] = {}

    def accumulator(self, columns: int) -> Accumulator:
        return InputNormAccumulator(columns)

    def outliers(self, name: str, stats: dict[str, Accumulator]) -> None:
        weights = [matrix_weight(m, p).detach() for m, p in self.layers.values()]
        norms = [_sq_norm(stats[n]) for n in self.layers]
        self.ratios[name] = outlier_ratio(weights, norms, self.config.owl_threshold)

    def compress_layer(
        self, block_name: str, key: str, layer: nn.Module, param: str, acc: Accumulator
    ) -> None:
        c = self.config
        mask = wanda_mask(
            matrix_weight(layer, param).detach(), _sq_norm(acc),
            self.sparsities.get(block_name, c.sparsity), n=c.n, m=c.m, prior=_prior(layer, param),
        )  # fmt: skip
        set_mask(WeightRef(_full(block_name, key), layer, param), mask)


def _sq_norm(acc: Accumulator) -> torch.Tensor:
    assert isinstance(acc, InputNormAccumulator)
    return acc.sq_norm()


class _OutlierScan(WandaCompressor):
    """First OWL pass: outlier ratios of the dense model, nothing pruned (every rank of a
    distributed run computes them from the same combined statistics)."""

    split = "replicated"

    def compress(self, name: str, block: nn.Module, stats: dict[str, Accumulator]) -> None:
        self.outliers(name, stats)


def _owl(model: nn.Module, config: WandaConfig, run: Run) -> dict[str, float]:
    if config.n:
        raise ConfigError("owl gives per-block unstructured sparsities; it does not apply to N:M")
    scan = _OutlierScan(config)
    batches = calibration_batches(run, config.calibration, "prune.wanda")
    task = run.require_task("prune.wanda")
    run_sequential(model, batches, scan, run.ctx, forward=task.forward)
    names = list(scan.ratios)
    values = owl_sparsities([scan.ratios[n] for n in names], config.sparsity, config.owl_lambda)
    log.info("OWL sparsities: %s", ", ".join(f"{n}: {s:.3f}" for n, s in zip(names, values)))
    return dict(zip(names, values, strict=True))


def _sparsegpt(config: SparseGPTConfig, run: Run) -> SparseGPTCompressor:
    return SparseGPTCompressor(config, run.data_free)


def _wanda(config: WandaConfig, run: Run) -> WandaCompressor:
    if config.owl:
        raise ConfigError(
            "owl needs a scan of the whole dense model first; it runs in memory only (drop"
            " --max-memory, or set owl: false)"
        )
    return WandaCompressor(config, data_free=run.data_free)


@register_method(
    "prune.sparsegpt",
    SparseGPTConfig,
    "SparseGPT: Hessian-aware one-shot pruning (unstructured or N:M) with weight updates",
    needs_data=True,
    layerwise=_sparsegpt,
)
def prune_sparsegpt(model: nn.Module, config: SparseGPTConfig, run: Run) -> None:
    run_layerwise(model, SparseGPTCompressor(config, run.data_free), run, config, "prune.sparsegpt")


@register_method(
    "prune.wanda",
    WandaConfig,
    "Wanda: prune by |W| x input norm (unstructured or N:M; OWL block sparsities)",
    needs_data=True,
    layerwise=_wanda,
)
def prune_wanda(model: nn.Module, config: WandaConfig, run: Run) -> None:
    sparsities = _owl(model, config, run) if config.owl else None
    run_layerwise(
        model, WandaCompressor(config, sparsities, run.data_free), run, config, "prune.wanda"
    )
