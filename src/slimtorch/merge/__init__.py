"""slimtorch.merge: model merging (linear, slerp, task arithmetic, TIES, DARE) and BN folding.

The maths is in ``methods`` (per tensor), ``stream``, ``mergekit`` and ``fuse``; the recipe
stages ``merge.linear``, ``merge.slerp``, ``merge.task_arithmetic``, ``merge.ties``,
``merge.dare`` and ``fuse.*`` are in :mod:`slimtorch.merge.stages` (found by discovery, see
:mod:`slimtorch.core.methods`), whose configs are importable from here.
``slimtorch merge CONFIG.yaml --out DIR`` runs mergekit-style configs through
:func:`merge_to_dir`, streaming one tensor at a time.
"""

from slimtorch.merge.fuse import FuseConfig, fuse_model
from slimtorch.merge.mergekit import MergeConfig, MergeInput, load_config, parse_config
from slimtorch.merge.methods import (
    TaskMergeOptions,
    dare,
    linear,
    slerp,
    task_arithmetic,
    task_merge,
    ties,
)
from slimtorch.merge.stages.merge import (
    DareMerge,
    LinearMerge,
    SlerpMerge,
    TaskArithmeticMerge,
    TiesMerge,
)
from slimtorch.merge.stream import merge_tensor, merge_to_dir, open_source

__all__ = [
    "DareMerge",
    "FuseConfig",
    "LinearMerge",
    "MergeConfig",
    "MergeInput",
    "SlerpMerge",
    "TaskArithmeticMerge",
    "TaskMergeOptions",
    "TiesMerge",
    "dare",
    "fuse_model",
    "linear",
    "load_config",
    "merge_tensor",
    "merge_to_dir",
    "open_source",
    "parse_config",
    "slerp",
    "task_arithmetic",
    "task_merge",
    "ties",
]
