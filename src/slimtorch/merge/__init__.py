"""slimtorch.merge: model merging (mergekit 0.1.5's methods, bit for bit) and BN folding.

The maths is in ``methods`` (linear, slerp, task arithmetic, TIES, DARE, DELLA), ``spherical``
(NuSLERP, Multi-SLERP, Karcher), ``selective`` (Model Stock, SCE, Arcee Fusion), ``stream``,
``mergekit`` and ``fuse``; the recipe stages ``merge.linear``, ``merge.slerp``,
``merge.task_arithmetic``, ``merge.ties``, ``merge.dare``, ``merge.della``, ``merge.model_stock``,
``merge.nuslerp``, ``merge.multislerp``, ``merge.karcher``, ``merge.sce``, ``merge.arcee_fusion``
and ``fuse.*`` are in :mod:`slimtorch.merge.stages` (found by discovery, see
:mod:`slimtorch.core.methods`), whose configs are importable from here.
``slimtorch merge CONFIG.yaml --out DIR`` runs mergekit-style configs through
:func:`merge_to_dir`, streaming one tensor at a time.
"""

from slimtorch.merge.fuse import FuseConfig, fuse_model
from slimtorch.merge.mergekit import MergeConfig, MergeInput, load_config, parse_config
from slimtorch.merge.methods import (
    TaskMergeOptions,
    dare,
    della_magprune,
    linear,
    slerp,
    task_arithmetic,
    task_merge,
    ties,
)
from slimtorch.merge.selective import arcee_fusion, model_stock, sce
from slimtorch.merge.spherical import karcher, multislerp, nuslerp
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
    "arcee_fusion",
    "dare",
    "della_magprune",
    "fuse_model",
    "karcher",
    "linear",
    "load_config",
    "merge_tensor",
    "merge_to_dir",
    "model_stock",
    "multislerp",
    "nuslerp",
    "open_source",
    "parse_config",
    "sce",
    "slerp",
    "task_arithmetic",
    "task_merge",
    "ties",
]
