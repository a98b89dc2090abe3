"""slimtorch.runtime: modules that execute compressed weights for real speed.

``RUNTIME_MODULES`` maps a type name to its module class, so the artifact loader can rebuild a
module from ``{"type": name, "config": module.config()}`` and then ``load_state_dict`` its buffers.
Every class registered here has ``config() -> dict`` and ``from_config(dict)``.
Which kernel runs on which device (CPU, CUDA by compute capability) and the fallback messages:
:mod:`slimtorch.runtime.device`.
"""

from __future__ import annotations

from torch import nn

from slimtorch.core.registry import Registry
from slimtorch.runtime.act_quant import ActQuantLinear
from slimtorch.runtime.attention import PrunedMultiheadAttention
from slimtorch.runtime.conv1d import Conv1DLinear, linearize_conv1d
from slimtorch.runtime.fp8 import Fp8Linear
from slimtorch.runtime.fused import FusedIdentity, FusedLayer
from slimtorch.runtime.hadamard import OnlineHadamardLinear
from slimtorch.runtime.int4 import Int4WeightOnlyLinear
from slimtorch.runtime.int8 import Int8DynamicLinear, onednn_available, quantize_weight_int8
from slimtorch.runtime.int8_weight import Int8WeightOnlyLinear
from slimtorch.runtime.lora_lowbit import LoRALinear
from slimtorch.runtime.lowrank import LowRankConv2d, LowRankLinear
from slimtorch.runtime.moe import UnfusedExperts
from slimtorch.runtime.rnn_int8 import Int8DynamicGRU, Int8DynamicLSTM
from slimtorch.runtime.sparse24 import SemiStructuredLinear, use_semi_structured

RUNTIME_MODULES: Registry[type[nn.Module]] = Registry("runtime module")
RUNTIME_MODULES.add("Int8DynamicLinear", Int8DynamicLinear)
RUNTIME_MODULES.add("Int4WeightOnlyLinear", Int4WeightOnlyLinear)
RUNTIME_MODULES.add("Int8WeightOnlyLinear", Int8WeightOnlyLinear)
RUNTIME_MODULES.add("FusedLayer", FusedLayer)
RUNTIME_MODULES.add("FusedIdentity", FusedIdentity)
RUNTIME_MODULES.add("LowRankLinear", LowRankLinear)
RUNTIME_MODULES.add("LowRankConv2d", LowRankConv2d)
RUNTIME_MODULES.add("PrunedMultiheadAttention", PrunedMultiheadAttention)
RUNTIME_MODULES.add("Conv1DLinear", Conv1DLinear)
RUNTIME_MODULES.add("Fp8Linear", Fp8Linear)
RUNTIME_MODULES.add("SemiStructuredLinear", SemiStructuredLinear)
RUNTIME_MODULES.add("OnlineHadamardLinear", OnlineHadamardLinear)  # H-ROT
RUNTIME_MODULES.add("ActQuantLinear", ActQuantLinear)  # H-ROT
RUNTIME_MODULES.add("UnfusedExperts", UnfusedExperts)
RUNTIME_MODULES.add("Int8DynamicLSTM", Int8DynamicLSTM)  # H-RNN
RUNTIME_MODULES.add("Int8DynamicGRU", Int8DynamicGRU)  # H-RNN
RUNTIME_MODULES.add("LoRALinear", LoRALinear)  # H-RECOV

__all__ = [
    "RUNTIME_MODULES",
    "ActQuantLinear",
    "Conv1DLinear",
    "Fp8Linear",
    "FusedIdentity",
    "FusedLayer",
    "Int4WeightOnlyLinear",
    "Int8DynamicGRU",
    "Int8DynamicLSTM",
    "Int8DynamicLinear",
    "Int8WeightOnlyLinear",
    "LowRankConv2d",
    "LowRankLinear",
    "OnlineHadamardLinear",
    "SemiStructuredLinear",
    "UnfusedExperts",
    "linearize_conv1d",
    "onednn_available",
    "quantize_weight_int8",
    "use_semi_structured",
]
