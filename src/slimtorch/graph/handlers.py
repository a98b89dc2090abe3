"""Per-layer handlers for structured pruning: which channel dims a layer has, and the surgery.

A :class:`LayerHandler` tells the dependency graph how a layer's channels sit in its activations
(``layout``), which dims are prunable (``dims``), the weights each channel owns (``weights``,
``grads``, for importance: weights, not buffers; slot handlers skip biases too) and how to physically drop channels (``prune``). Most handlers are
:class:`~slimtorch.graph.slots.SlotHandler`s: one description per dim gives both the importance
views and the surgery. ``handler_for`` looks a module up by exact class, then by class names
along its MRO; users add their own layers with :func:`register_handler`. Convolutions live in
``conv_handlers``, LSTM/GRU/RNN in ``rnn_handlers``; both register on import of this module.
Handlers for ``nn.MultiheadAttention`` live in ``slimtorch.runtime.attention`` (their surgery
returns a runtime module, and graph may not import runtime): import ``slimtorch.runtime`` to
register them.
"""

from __future__ import annotations

from typing import Protocol

from torch import Tensor, nn

from slimtorch.core.registry import Registry
from slimtorch.graph.conv_handlers import ConvHandler
from slimtorch.graph.rnn_handlers import RNNHandler
from slimtorch.graph.slots import Layout, Slot, SlotHandler, num

__all__ = [
    "HANDLERS",
    "LayerHandler",
    "Layout",
    "handler_for",
    "register_handler",
]


class LayerHandler(Protocol):
    """How structured pruning sees one layer type (see the module docstring)."""

    layout: Layout

    def dims(self, module: nn.Module) -> dict[str, int]: ...
    def coupled(self, module: nn.Module) -> bool: ...
    def tiles(self, module: nn.Module, dim: str) -> int: ...
    def blocks(self, module: nn.Module, dim: str) -> int: ...
    def weights(self, module: nn.Module, dim: str) -> list[tuple[Tensor, int]]: ...
    def grads(self, module: nn.Module, dim: str) -> list[tuple[Tensor | None, int]]: ...
    def prune(self, module: nn.Module, dim: str, keep: Tensor) -> nn.Module | None: ...


HANDLERS: Registry[LayerHandler] = Registry("layer handler")
_BY_TYPE: dict[type, LayerHandler] = {}


def register_handler(layer: type[nn.Module] | str, handler: LayerHandler) -> None:
    """Use ``handler`` for modules of class ``layer`` (a class, or a class name for any module
    whose class or a base class has that name)."""
    if isinstance(layer, str):
        HANDLERS.add(layer, handler)
        return
    HANDLERS.add(f"{layer.__module__}.{layer.__qualname__}", handler)
    _BY_TYPE[layer] = handler


def handler_for(module: nn.Module) -> LayerHandler | None:
    """The handler of ``module``: exact class first, then class names along the MRO."""
    for cls in type(module).__mro__:
        if cls in _BY_TYPE:
            return _BY_TYPE[cls]
        if cls.__name__ in HANDLERS:
            return HANDLERS.get(cls.__name__)
        if cls is nn.Module:
            break
    return None


class LinearHandler(SlotHandler):
    def dims(self, module: nn.Module) -> dict[str, int]:
        return {"in": num(module, "in_features"), "out": num(module, "out_features")}

    def slots(self, module: nn.Module, dim: str) -> list[Slot]:
        return [Slot("weight", 0), Slot("bias", 0)] if dim == "out" else [Slot("weight", 1)]

    def resize(self, module: nn.Module, dim: str, n: int) -> None:
        setattr(module, "out_features" if dim == "out" else "in_features", n)


class HFConv1DHandler(SlotHandler):
    """transformers' ``Conv1D`` (GPT-2): a Linear with weight ``[in, out]``; ``nf`` outputs."""

    def dims(self, module: nn.Module) -> dict[str, int]:
        return {"in": num(module, "nx"), "out": num(module, "nf")}

    def slots(self, module: nn.Module, dim: str) -> list[Slot]:
        return [Slot("weight", 1), Slot("bias", 0)] if dim == "out" else [Slot("weight", 0)]

    def resize(self, module: nn.Module, dim: str, n: int) -> None:
        setattr(module, "nf" if dim == "out" else "nx", n)


class NormHandler(SlotHandler):
    """BatchNorm (``first``), LayerNorm/RMSNorm (``last``), GroupNorm (blocks = num_groups).

    LayerNorm and GroupNorm normalize over the kept channels only, so their output changes a
    little beyond the restriction (as in every structured pruner); BatchNorm's is exact."""

    is_coupled = True

    def __init__(self, layout: Layout, size_attr: str) -> None:
        self.layout = layout
        self.size_attr = size_attr

    def dims(self, module: nn.Module) -> dict[str, int]:
        size = getattr(module, self.size_attr)
        return {"out": int(size[-1] if isinstance(size, tuple | list) else size)}

    def blocks(self, module: nn.Module, dim: str) -> int:
        return int(getattr(module, "num_groups", 1))

    def slots(self, module: nn.Module, dim: str) -> list[Slot]:
        names = ("weight", "bias", "running_mean", "running_var")
        return [Slot(n, -1 if self.layout == "last" else 0) for n in names]

    def resize(self, module: nn.Module, dim: str, n: int) -> None:
        size = getattr(module, self.size_attr)
        setattr(module, self.size_attr, (*size[:-1], n) if isinstance(size, tuple | list) else n)


class EmbeddingHandler(SlotHandler):
    def dims(self, module: nn.Module) -> dict[str, int]:
        return {"out": num(module, "embedding_dim")}

    def slots(self, module: nn.Module, dim: str) -> list[Slot]:
        return [Slot("weight", 1)]

    def resize(self, module: nn.Module, dim: str, n: int) -> None:
        setattr(module, "embedding_dim", n)  # noqa: B010


class PReLUHandler(SlotHandler):
    """Per-channel PReLU is coupled; a single shared slope is transparent (``dims() == {}``)."""

    layout: Layout = "first"
    is_coupled = True

    def dims(self, module: nn.Module) -> dict[str, int]:
        n = num(module, "num_parameters")
        return {"out": n} if n > 1 else {}

    def slots(self, module: nn.Module, dim: str) -> list[Slot]:
        return [Slot("weight", 0)]

    def resize(self, module: nn.Module, dim: str, n: int) -> None:
        setattr(module, "num_parameters", n)  # noqa: B010


def _register_builtins() -> None:
    register_handler("Linear", LinearHandler())
    register_handler("Conv1D", HFConv1DHandler())
    for name in ("Conv1d", "Conv2d", "Conv3d"):
        register_handler(name, ConvHandler())
    for name in ("BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm"):
        register_handler(name, NormHandler("first", "num_features"))
    register_handler("LayerNorm", NormHandler("last", "normalized_shape"))
    register_handler("RMSNorm", NormHandler("last", "normalized_shape"))
    register_handler("GroupNorm", NormHandler("first", "num_channels"))
    register_handler("Embedding", EmbeddingHandler())
    register_handler("PReLU", PReLUHandler())
    register_handler("LSTM", RNNHandler(4))
    register_handler("GRU", RNNHandler(3))
    register_handler("RNN", RNNHandler(1))


_register_builtins()
