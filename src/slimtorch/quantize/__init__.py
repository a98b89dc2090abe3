"""slimtorch.quantize: affine (int2..int8), binary/ternary, QAT and dynamic int8 quantization.

Importing this package registers the recipe methods ``quantize.rtn``, ``quantize.binary``,
``quantize.ternary``, ``quantize.qat``, ``quantize.dynamic_int8``, ``quantize.gptq``,
``quantize.awq`` and ``quantize.smoothquant``.
"""

from slimtorch.quantize import dynamic, gptq_stage, qat, rtn, scaling
from slimtorch.quantize.affine import fake_quantize, quantize_weight
from slimtorch.quantize.binary import binarize, ternarize
from slimtorch.quantize.observers import minmax_range, mse_range
from slimtorch.quantize.primitives import QuantSpec

__all__ = [
    "QuantSpec",
    "binarize",
    "dynamic",
    "fake_quantize",
    "gptq_stage",
    "minmax_range",
    "mse_range",
    "qat",
    "quantize_weight",
    "rtn",
    "scaling",
    "ternarize",
]
