"""Structured-pruning handler for ``nn.LSTM``, ``nn.GRU`` and ``nn.RNN``.

``in`` is ``input_size`` (columns of every direction's ``weight_ih_l0``). ``out`` is a hidden
unit: in every layer and direction it owns one row per gate of ``weight_ih``/``weight_hh`` and
the biases (gates laid out ``[gates, hidden]``), one column of ``weight_hh``, and in layers
``k > 0`` the columns ``c`` and ``hidden + c`` of ``weight_ih`` (the previous layer's
directions). A bidirectional output repeats the units twice (``tiles("out") == 2``). With
``proj_size > 0`` the output is the projection, so only ``in`` is prunable.
"""

from __future__ import annotations

from torch import Tensor, nn

from slimtorch.graph.slots import Layout, Slot, SlotHandler, num


def _suffixes(module: nn.Module) -> list[str]:
    return ["", "_reverse"] if module.bidirectional else [""]


class RNNHandler(SlotHandler):
    """``gates`` = 4 (LSTM), 3 (GRU), 1 (RNN)."""

    layout: Layout = "last"

    def __init__(self, gates: int) -> None:
        self.gates = gates

    def dims(self, module: nn.Module) -> dict[str, int]:
        dims = {"in": num(module, "input_size")}
        if int(getattr(module, "proj_size", 0)) == 0:
            dims["out"] = num(module, "hidden_size")
        return dims

    def tiles(self, module: nn.Module, dim: str) -> int:
        return 2 if dim == "out" and module.bidirectional else 1

    def slots(self, module: nn.Module, dim: str) -> list[Slot]:
        if dim == "in":
            return [Slot(f"weight_ih_l0{sfx}", 1) for sfx in _suffixes(module)]
        g, dirs = self.gates, len(_suffixes(module))
        out: list[Slot] = []
        for layer in range(num(module, "num_layers")):
            for sfx in _suffixes(module):
                tag = f"l{layer}{sfx}"
                out.append(Slot(f"weight_ih_{tag}", 0, outer=g))
                if layer > 0:
                    out.append(Slot(f"weight_ih_{tag}", 1, outer=dirs))
                out += [Slot(f"weight_hh_{tag}", 0, outer=g), Slot(f"weight_hh_{tag}", 1)]
                out += [Slot(f"bias_ih_{tag}", 0, outer=g), Slot(f"bias_hh_{tag}", 0, outer=g)]
        return out

    def prune(self, module: nn.Module, dim: str, keep: Tensor) -> nn.Module | None:
        result = super().prune(module, dim, keep)
        # setattr keeps RNNBase._flat_weights in step; rebuild it from the names to be sure and
        # re-pack for cuDNN (a no-op on CPU).
        module._init_flat_weights()  # type: ignore[operator]
        module.flatten_parameters()  # type: ignore[operator]
        return result

    def resize(self, module: nn.Module, dim: str, n: int) -> None:
        setattr(module, "input_size" if dim == "in" else "hidden_size", n)
