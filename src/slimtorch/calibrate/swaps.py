"""Stages that swap runtime modules in (``quantize.activations``, ``quantize.fp8 activations:
dynamic``) on the offloaded path (``slimtorch compress --max-memory``), one part at a time.

A swap needs no data and no other weights than the layer's own, so the offloaded run applies it
to each block as the block streams by and to the layers outside the blocks, through the function
the in-memory stage runs on the whole model: :class:`SwapParts` calls it on the block seen from
a root under which its layers have their full names (:func:`rooted`), so targets and ``ignore``
given as names or regexes select what they select in memory. The manifest's ``modules`` records
are computed up front on the ``meta`` model (workflows/offloaded.py), as quantize.rotate's are.
"""

from __future__ import annotations

from torch import nn

from slimtorch.calibrate.sequential import Accumulator, DataFree
from slimtorch.core.errors import TargetError, UnsupportedModelError
from slimtorch.graph.weights import select_weights


def rooted(block: nn.Module, name: str) -> nn.Module:
    """A new root holding ``block`` at the dotted path ``name`` (``""``: the block itself), so
    that ``named_modules`` gives the block's layers their full names in the model; replacing a
    layer through the root replaces it in ``block``."""
    if not name:
        return block
    root = node = nn.Module()
    *path, leaf = name.split(".")
    for part in path:
        child = nn.Module()
        node.add_module(part, child)
        node = child
    node.add_module(leaf, block)
    return root


class SwapParts(DataFree):
    """The layer-wise form of a module-swapping stage: ``fn(model)`` swaps the layers it selects
    (none selected: nothing, no error) on each block under its full name, and on the model
    without its blocks (the layers outside them, called by the offloaded run). Observing and
    construction are :class:`DataFree`'s; only the rooting of each block is its own."""

    def compress(self, name: str, block: nn.Module, stats: dict[str, Accumulator]) -> None:
        self.fn(rooted(block, name))


def skip_bare_parts(stage: DataFree) -> DataFree:
    """``stage`` made to skip a part with no compressible layer left (a block whose layers were
    all swapped for runtime modules, such as Fp8Linear): on the whole model in memory the other
    parts still hold some, so the in-memory stage finds none there either. Returns ``stage``."""
    fn = stage.fn

    def guarded(part: nn.Module) -> None:
        try:
            select_weights(part)
        except UnsupportedModelError:
            return
        except TargetError:
            pass
        fn(part)

    stage.fn = guarded
    return stage
