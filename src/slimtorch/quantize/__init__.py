"""slimtorch.quantize: affine (int2..int8), binary/ternary, QAT and dynamic int8 quantization.

The maths is in this package's modules (``affine``, ``binary``, ``gptq``, ``awq``,
``smoothquant``, ``qat``, ``scaling``); the recipe stages ``quantize.rtn``, ``quantize.binary``,
``quantize.ternary``, ``quantize.qat``, ``quantize.dynamic_int8``, ``quantize.gptq``,
``quantize.awq`` and ``quantize.smoothquant`` are in :mod:`slimtorch.quantize.stages` (found by
discovery, see :mod:`slimtorch.core.methods`). Their configs are importable from here, for
``st.compress(model, [RTNConfig(bits=4)])``.
"""

from slimtorch.quantize.affine import fake_quantize, quantize_weight
from slimtorch.quantize.binary import binarize, ternarize
from slimtorch.quantize.observers import minmax_range, mse_range
from slimtorch.quantize.primitives import QuantSpec
from slimtorch.quantize.stages.dynamic import DynamicInt8Config
from slimtorch.quantize.stages.gptq import GPTQConfig
from slimtorch.quantize.stages.qat import QATConfig
from slimtorch.quantize.stages.rtn import BinaryConfig, RTNConfig, TernaryConfig
from slimtorch.quantize.stages.scaling import AWQConfig, SmoothQuantConfig

__all__ = [
    "AWQConfig",
    "BinaryConfig",
    "DynamicInt8Config",
    "GPTQConfig",
    "QATConfig",
    "QuantSpec",
    "RTNConfig",
    "SmoothQuantConfig",
    "TernaryConfig",
    "binarize",
    "fake_quantize",
    "minmax_range",
    "mse_range",
    "quantize_weight",
    "ternarize",
]
