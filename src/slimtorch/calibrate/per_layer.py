"""A block compressor whose layers are compressed one at a time, each from its own statistics.

GPTQ (a Hessian per layer), SparseGPT (a Hessian) and Wanda (input norms) all: select the
block's matrices, give each an accumulator, and after the block's calibration pass compress
each layer alone. :class:`PerLayerCompressor` is that skeleton; a method says which
accumulator a layer gets (:meth:`accumulator`) and what it does with one layer
(:meth:`compress_layer`). A distributed run compresses each layer on one owner rank
(``split = "layers"``: :func:`slimtorch.calibrate.distributed.compress_shared`).

Layers of a mixture-of-experts expert that no calibration token reached get neutral statistics
(:func:`~slimtorch.calibrate.statistics.expert_statistics`) and are listed in the run's note
(``data_free``). The list is made from every layer of the block, not only the ones this rank
owns: the statistics are already combined over the ranks, so every rank (and rank 0, which
writes the artifact) lists the same layers.
"""

from __future__ import annotations

import logging
from typing import Any

from torch import nn

from slimtorch.calibrate.sequential import Accumulator, block_matrices, matrix_weight
from slimtorch.calibrate.statistics import expert_statistics, starved, use_sum_dtype

log = logging.getLogger(__name__)


class PerLayerCompressor:
    """Skeleton of a layer-by-layer block compressor (see the module docstring)."""

    split = "layers"  # a distributed run: each layer compressed by one rank
    stage = ""  # the recipe method, for messages
    fallback = ""  # what a layer no calibration token reached gets instead

    def __init__(self, config: Any, data_free: list[str] | None = None) -> None:
        self.config = config
        self.data_free = [] if data_free is None else data_free  # the run's note
        self.layers: dict[str, tuple[nn.Module, str]] = {}

    def accumulator(self, columns: int) -> Accumulator:
        """The statistics one layer of ``columns`` inputs collects."""
        raise NotImplementedError

    def select(self, name: str, block: nn.Module) -> dict[str, tuple[nn.Module, str]]:
        """The matrices of ``block`` this stage compresses (layer key -> module, parameter)."""
        return block_matrices(block, name, self.config)

    def observe(self, name: str, block: nn.Module) -> dict[str, Accumulator]:
        """One accumulator per layer, its running sums in ``calibration.sum_dtype``."""
        self.layers = self.select(name, block)
        stats = {
            n: self.accumulator(matrix_weight(m, p).shape[1]) for n, (m, p) in self.layers.items()
        }
        return use_sum_dtype(expert_statistics(block, stats), self.config.calibration.sum_dtype)

    def compress(self, name: str, block: nn.Module, stats: dict[str, Accumulator]) -> None:
        self.compress_layers(name, block, stats, list(self.layers))

    def compress_layers(
        self, name: str, block: nn.Module, stats: dict[str, Accumulator], keys: list[str]
    ) -> None:
        """Compress the layers ``keys`` of ``block`` (a rank's share, or all of them)."""
        if none := starved(name, stats, list(self.layers)):
            log.warning("%s: no calibration token reached %s: %s instead", self.stage, none,
                        self.fallback)  # fmt: skip
            self.data_free.extend(none)
        for key in keys:
            layer, param = self.layers[key]
            self.compress_layer(name, key, layer, param, stats[key])

    def compress_layer(
        self, block_name: str, key: str, layer: nn.Module, param: str, acc: Accumulator
    ) -> None:
        """Compress ``layer.param`` (``key`` in block ``block_name``) from its statistics."""
        raise NotImplementedError
