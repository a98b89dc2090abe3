"""Which parameters of which layers are compressible weights, and how to select them.

Every technique works on :class:`WeightRef`: one weight parameter of one module. A weight is
seen as a matrix ``[out, in]`` by :meth:`WeightRef.matrix_view` (convolutions flatten their input
channels and kernel with the input channel fastest-varying last, so N:M groups run along input
channels; embeddings treat the embedding dimension as the input).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from slimtorch.core.errors import UnsupportedModelError
from slimtorch.core.targets import Targets
from slimtorch.formats.state import from_matrix, to_matrix  # noqa: F401  (re-exported)

SUPPORTED_TYPES: tuple[str, ...] = (
    "Linear",
    "Conv1d",
    "Conv2d",
    "Embedding",
    "MultiheadAttention",
    "LSTM",
    "GRU",
)

_RNN_PREFIXES = ("weight_ih_l", "weight_hh_l")


@dataclass(frozen=True)
class WeightRef:
    """One compressible weight: ``getattr(module, param)`` of the module named ``module_name``."""

    module_name: str
    module: nn.Module
    param: str

    @property
    def name(self) -> str:
        """Full parameter name, as in ``model.state_dict()``."""
        return f"{self.module_name}.{self.param}" if self.module_name else self.param

    @property
    def kind(self) -> str:
        """The supported layer type this weight belongs to (``Linear``, ``LSTM``, ...)."""
        for cls in type(self.module).__mro__:
            if cls.__name__ in SUPPORTED_TYPES:
                return cls.__name__
        return type(self.module).__name__

    @property
    def weight(self) -> nn.Parameter:
        return getattr(self.module, self.param)  # type: ignore[no-any-return]

    def numel(self) -> int:
        return self.weight.numel()


def _module_weights(module: nn.Module) -> list[str]:
    kinds = {cls.__name__ for cls in type(module).__mro__}
    if kinds & {"Linear", "Conv1d", "Conv2d", "Embedding"}:
        return ["weight"] if isinstance(getattr(module, "weight", None), torch.Tensor) else []
    if "MultiheadAttention" in kinds:
        names = [
            n
            for n in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")
            if getattr(module, n, None) is not None
        ]
        return names
    if kinds & {"LSTM", "GRU"}:
        return [n for n, _ in module.named_parameters(recurse=False) if n.startswith(_RNN_PREFIXES)]
    return []


def select_weights(
    model: nn.Module,
    targets: Sequence[str] | None = None,
    ignore: Sequence[str] = (),
    types: Sequence[str] = SUPPORTED_TYPES,
) -> list[WeightRef]:
    """The compressible weights of ``model`` whose module matches ``targets`` and not ``ignore``.

    A MultiheadAttention target also selects its ``out_proj``. Raises TargetError naming what
    the model has when nothing matches, and UnsupportedModelError when the model has no
    supported layer at all.
    """
    sel = Targets.of(targets, ignore)
    found: dict[str, WeightRef] = {}
    any_supported = False
    for name, module in model.named_modules():
        params = _module_weights(module)
        kind = next(
            (c.__name__ for c in type(module).__mro__ if c.__name__ in SUPPORTED_TYPES), None
        )
        if not params or kind is None:
            continue
        any_supported = True
        if kind not in types or not sel.selects(name, module):
            continue
        for p in params:
            ref = WeightRef(name, module, p)
            found.setdefault(ref.name, ref)
        if kind == "MultiheadAttention":
            out = module.out_proj
            ref = WeightRef(f"{name}.out_proj" if name else "out_proj", out, "weight")
            if not any(sel.matches(p, ref.module_name, out) for p in sel.ignore):
                found.setdefault(ref.name, ref)
    if not any_supported:
        raise UnsupportedModelError(
            f"the model has no layer slimtorch can compress (supported: {', '.join(SUPPORTED_TYPES)});"
            " wrap custom layers around nn.Linear or nn.Conv2d, or register a handler"
        )
    if not found:
        raise sel.no_match_error(model, [t for t in types])
    refs = list(found.values())
    for ref in refs:
        check_finite(ref)
    return refs


def check_finite(ref: WeightRef) -> None:
    """Refuse NaN or Inf weights with an error naming the layer."""
    w = ref.weight.detach()
    if w.is_meta:  # no values yet (a model built without its weights)
        return
    if not torch.isfinite(w).all():
        bad = int((~torch.isfinite(w)).sum())
        raise UnsupportedModelError(
            f"weight {ref.name!r} holds {bad} NaN/Inf values; fix or retrain the model before"
            " compressing it"
        )


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule called ``name`` (dotted path) by ``new``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
