"""The target vocabulary: a class name (``Linear``), an exact module name, or ``re:<regex>``.

A class name matches the module's class or any of its base classes, so ``Linear`` also matches
subclasses such as MultiheadAttention's ``NonDynamicallyQuantizableLinear``.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from torch import nn

from slimtorch.core.errors import ConfigError, TargetError


def _class_names(module: nn.Module) -> set[str]:
    return {cls.__name__ for cls in type(module).__mro__}


@dataclass(frozen=True)
class Targets:
    """A parsed selection of modules: what to include and what to ignore."""

    include: tuple[str, ...] | None = None
    ignore: tuple[str, ...] = field(default_factory=tuple)

    @classmethod
    def of(cls, targets: Sequence[str] | None, ignore: Sequence[str] = ()) -> Targets:
        for pattern in list(targets or []) + list(ignore):
            if pattern.startswith("re:"):
                try:
                    re.compile(pattern[3:])
                except re.error as exc:
                    raise ConfigError(f"invalid regex in target {pattern!r}: {exc}") from None
        return cls(tuple(targets) if targets is not None else None, tuple(ignore))

    @staticmethod
    def matches(pattern: str, name: str, module: nn.Module) -> bool:
        if pattern.startswith("re:"):
            return re.fullmatch(pattern[3:], name) is not None
        return pattern == name or pattern in _class_names(module)

    def selects(self, name: str, module: nn.Module) -> bool:
        if any(self.matches(p, name, module) for p in self.ignore):
            return False
        if self.include is None:
            return True
        return any(self.matches(p, name, module) for p in self.include)

    def no_match_error(self, model: nn.Module, supported: Iterable[str] = ()) -> TargetError:
        """An error that says what the model does have, so the user can fix ``targets``."""
        return TargetError(
            f"no module matched targets {list(self.include) if self.include else 'all'}"
            f" (ignore={list(self.ignore)}); model has: {describe_model(model)}"
            + (f"; supported layer types: {', '.join(supported)}" if supported else "")
            + ". Check `targets` and `ignore`."
        )


_CONTAINERS_WORTH_NAMING = {"MultiheadAttention", "LSTM", "GRU"}


def describe_model(model: nn.Module, limit: int = 12) -> str:
    """``Conv2d x2, Linear x3, ...`` for the leaf modules of ``model``."""
    counts = Counter(
        type(m).__name__
        for _, m in model.named_modules()
        if not list(m.children()) or type(m).__name__ in _CONTAINERS_WORTH_NAMING
    )
    parts = [f"{k} x{v}" for k, v in counts.most_common(limit)]
    return ", ".join(parts) if parts else "no layers"
