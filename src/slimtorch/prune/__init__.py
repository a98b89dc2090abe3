"""slimtorch.prune: unstructured, N:M, gradual and structured pruning.

The maths is in this package's modules (``criteria``, ``masking``, ``nm``, ``schedules``,
``sparsegpt``, ``wanda``, ``importance``, ``structured``, ``permutation``, ``reorder``,
``slimmable``); the recipe stages ``prune.magnitude``, ``prune.threshold``, ``prune.random``,
``prune.probabilistic``, ``prune.nm``, ``prune.gradual``, ``prune.structured``,
``prune.permute``, ``prune.reorder``, ``prune.sparsegpt``, ``prune.wanda`` and
``train.slimmable`` are in :mod:`slimtorch.prune.stages` (found by discovery, see
:mod:`slimtorch.core.methods`), whose configs are importable from here.
"""

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
from slimtorch.prune.stages.layerwise import SparseGPTConfig, WandaConfig
from slimtorch.prune.stages.reorder import PermuteConfig, ReorderConfig
from slimtorch.prune.stages.slimmable import SlimmableConfig
from slimtorch.prune.stages.unstructured import (
    GradualConfig,
    MagnitudeConfig,
    NMConfig,
    ProbabilisticConfig,
    RandomConfig,
    ThresholdConfig,
)
from slimtorch.prune.structured import StructuredConfig

__all__ = [
    "CubicSchedule",
    "GradualConfig",
    "GradualPruning",
    "MagnitudeConfig",
    "NMConfig",
    "PermuteConfig",
    "ProbabilisticConfig",
    "RandomConfig",
    "ReorderConfig",
    "SlimmableConfig",
    "SparseGPTConfig",
    "StructuredConfig",
    "ThresholdConfig",
    "WandaConfig",
    "cubic_sparsity",
    "global_magnitude_masks",
    "is_nm_sparse",
    "lowest_k_mask",
    "magnitude_mask",
    "magnitude_prune",
    "nm_mask",
    "probabilistic_mask",
    "random_mask",
    "reapply_masks",
    "set_mask",
    "sparsity_of",
    "threshold_mask",
]
