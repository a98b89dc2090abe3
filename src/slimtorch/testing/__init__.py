"""Tiny models, a Task from tensors, and assertion helpers, importable by users' own tests."""

from slimtorch.testing.models import (
    TinyCNN,
    TinyLSTM,
    TinyTransformer,
    tiny_cnn,
    tiny_lstm,
    tiny_transformer,
)
from slimtorch.testing.tasks import TensorTask, tensor_task

__all__ = [
    "TensorTask",
    "TinyCNN",
    "TinyLSTM",
    "TinyTransformer",
    "tensor_task",
    "tiny_cnn",
    "tiny_lstm",
    "tiny_transformer",
]
