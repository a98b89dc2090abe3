"""The bundled models, their weights, datasets, tasks, evaluators and training scripts.

Importing this package registers every builtin model (each file registers its own). No generic
package imports it: slimtorch finds it through the ``slimtorch.plugins`` entry point.
"""

from slimtorch.zoo import austen_lm, char_lstm, lenet, minilm, resnet  # noqa: F401
