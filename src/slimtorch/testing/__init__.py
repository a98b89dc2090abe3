"""Tiny models and assertion helpers, importable by users' own tests."""

from slimtorch.testing.models import (
    TinyCNN,
    TinyLSTM,
    TinyTransformer,
    tiny_cnn,
    tiny_lstm,
    tiny_transformer,
)

__all__ = ["TinyCNN", "TinyLSTM", "TinyTransformer", "tiny_cnn", "tiny_lstm", "tiny_transformer"]
