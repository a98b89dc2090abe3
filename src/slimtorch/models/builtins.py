"""Importing this module registers every builtin model (each file registers its own)."""

from slimtorch.models import char_lstm, lenet, minilm  # noqa: F401
