"""The recipe stages of prune, one module per family: ``unstructured`` (``prune.magnitude``,
``threshold``, ``random``, ``probabilistic``, ``nm``, ``gradual``), ``layerwise``
(``prune.sparsegpt``, ``prune.wanda``), ``structured``, ``reorder`` (``prune.permute``,
``prune.reorder``) and ``slimmable`` (``train.slimmable``; ``train`` is an alias prefix, see
:data:`slimtorch.core.methods.PREFIX_ALIASES`). Each holds the typed configs, the ``apply``
functions and their glue; the maths is in the modules of ``slimtorch.prune``. Every module here is
found by :func:`slimtorch.core.methods.load_methods`: a new one needs no import list.
"""
