"""Find and rewrite modules: the weights each layer type exposes to compression methods."""

from slimtorch.graph.weights import (
    SUPPORTED_TYPES,
    WeightRef,
    from_matrix,
    replace_module,
    select_weights,
    to_matrix,
)

__all__ = [
    "SUPPORTED_TYPES",
    "WeightRef",
    "from_matrix",
    "replace_module",
    "select_weights",
    "to_matrix",
]
