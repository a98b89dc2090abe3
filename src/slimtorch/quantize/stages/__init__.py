"""The recipe stages of quantize, one module per family: ``rtn`` (``quantize.rtn``, ``binary``,
``ternary``), ``dynamic`` (``quantize.dynamic_int8``), ``gptq``, ``qat``, ``scaling``
(``quantize.awq``, ``quantize.smoothquant``). Each holds the typed configs, the ``apply``
functions and their glue; the maths is in the modules of ``slimtorch.quantize``. Every module
here is found by :func:`slimtorch.core.methods.load_methods`: a new one needs no import list.
"""
