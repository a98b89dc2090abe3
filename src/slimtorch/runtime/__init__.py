"""slimtorch.runtime: modules that execute compressed weights for real speed.

``RUNTIME_MODULES`` maps a type name to its module class, so the artifact loader can rebuild a
module from ``{"type": name, "config": module.config()}`` and then ``load_state_dict`` its buffers.
Every class registered here has ``config() -> dict`` and ``from_config(dict)``.
"""

from __future__ import annotations

from torch import nn

from slimtorch.core.registry import Registry
from slimtorch.runtime.int8 import Int8DynamicLinear, onednn_available, quantize_weight_int8

RUNTIME_MODULES: Registry[type[nn.Module]] = Registry("runtime module")
RUNTIME_MODULES.add("Int8DynamicLinear", Int8DynamicLinear)

__all__ = ["RUNTIME_MODULES", "Int8DynamicLinear", "onednn_available", "quantize_weight_int8"]
