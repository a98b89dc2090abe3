"""slimtorch.lowrank: truncated-SVD factorization of Linear and Conv2d layers.

The maths is in ``svd``, ``whiten`` and ``factor`` (:func:`lowrank_model` factors a model's
layers); the recipe stage ``lowrank.svd`` (plain or data-whitened SVD) is in
:mod:`slimtorch.lowrank.stages`, found by discovery (see :mod:`slimtorch.core.methods`).
"""

from slimtorch.lowrank.factor import CalibrationOptions, LowRankConfig, factorize, lowrank_model
from slimtorch.lowrank.svd import (
    choose_rank,
    energy_rank,
    params_rank,
    reduces_params,
    singular_values,
    truncated_svd,
)
from slimtorch.lowrank.whiten import (
    input_grams,
    whitened_singular_values,
    whitened_svd,
    whitening_factor,
)

__all__ = [
    "CalibrationOptions",
    "LowRankConfig",
    "choose_rank",
    "energy_rank",
    "factorize",
    "input_grams",
    "lowrank_model",
    "params_rank",
    "reduces_params",
    "singular_values",
    "truncated_svd",
    "whitened_singular_values",
    "whitened_svd",
    "whitening_factor",
]
