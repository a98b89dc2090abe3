"""slimtorch.prune: unstructured, N:M, gradual and structured pruning.

Importing this package registers the recipe methods ``prune.magnitude``, ``prune.threshold``,
``prune.random``, ``prune.probabilistic``, ``prune.nm``, ``prune.gradual`` and
``prune.structured``, ``prune.permute``, ``prune.reorder``, ``prune.sparsegpt`` and
``prune.wanda``.
"""

from slimtorch.prune import layerwise as layerwise
from slimtorch.prune import methods as methods
from slimtorch.prune import reorder as reorder
from slimtorch.prune import slimmable as slimmable
from slimtorch.prune import structured as structured
from slimtorch.prune.criteria import (
    global_magnitude_masks,
    lowest_k_mask,
    magnitude_mask,
    probabilistic_mask,
    random_mask,
    threshold_mask,
)
from slimtorch.prune.masking import magnitude_prune, reapply_masks, set_mask, sparsity_of
from slimtorch.prune.nm import is_nm_sparse, nm_mask
from slimtorch.prune.schedules import CubicSchedule, GradualPruning, cubic_sparsity

__all__ = [
    "CubicSchedule",
    "GradualPruning",
    "cubic_sparsity",
    "global_magnitude_masks",
    "is_nm_sparse",
    "layerwise",
    "lowest_k_mask",
    "magnitude_mask",
    "magnitude_prune",
    "methods",
    "nm_mask",
    "probabilistic_mask",
    "random_mask",
    "reapply_masks",
    "reorder",
    "set_mask",
    "sparsity_of",
    "structured",
    "threshold_mask",
]
