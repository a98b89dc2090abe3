"""slimtorch.lowrank: truncated-SVD factorization of Linear and Conv2d layers.

Importing this package registers the ``lowrank.svd`` recipe stage.
"""

from slimtorch.lowrank.stage import LowRankConfig, factorize, lowrank_model
from slimtorch.lowrank.svd import (
    choose_rank,
    energy_rank,
    params_rank,
    reduces_params,
    singular_values,
    truncated_svd,
)

__all__ = [
    "LowRankConfig",
    "choose_rank",
    "energy_rank",
    "factorize",
    "lowrank_model",
    "params_rank",
    "reduces_params",
    "singular_values",
    "truncated_svd",
]
