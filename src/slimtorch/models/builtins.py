"""Importing this module registers every builtin model (each file registers its own)."""

from slimtorch.models import austen_lm, char_lstm, lenet, minilm, resnet  # noqa: F401
