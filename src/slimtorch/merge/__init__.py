"""slimtorch.merge: model merging (linear, slerp, task arithmetic, TIES, DARE) and BN folding.

Importing this package registers the recipe methods ``merge.linear``, ``merge.slerp``,
``merge.task_arithmetic``, ``merge.ties``, ``merge.dare`` and the ``fuse.*`` stages.
``slimtorch merge CONFIG.yaml --out DIR`` runs mergekit-style configs through
:func:`merge_to_dir`, streaming one tensor at a time.
"""

from slimtorch.merge import fuse as fuse
from slimtorch.merge import stage as stage
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
from slimtorch.merge.stream import merge_tensor, merge_to_dir, open_source

__all__ = [
    "MergeConfig",
    "MergeInput",
    "TaskMergeOptions",
    "dare",
    "fuse",
    "linear",
    "load_config",
    "merge_tensor",
    "merge_to_dir",
    "open_source",
    "parse_config",
    "slerp",
    "stage",
    "task_arithmetic",
    "task_merge",
    "ties",
]
