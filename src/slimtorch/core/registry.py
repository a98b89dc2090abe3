"""A typed name -> object registry whose lookup errors list the known names and the nearest one."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from slimtorch.core.errors import ConfigError

T = TypeVar("T")


def nearest(name: str, candidates: list[str]) -> str | None:
    """The closest candidate to ``name`` by edit similarity, if any is reasonably close."""
    found = difflib.get_close_matches(name, candidates, n=1, cutoff=0.5)
    return found[0] if found else None


class Registry(Generic[T]):
    """Maps names to objects. ``kind`` names what is registered, for error messages."""

    def __init__(self, kind: str, plugins: bool = False) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}
        self._plugins = plugins  # load the slimtorch.plugins entry points before a lookup

    def _ready(self) -> dict[str, T]:
        if self._plugins:
            from slimtorch.core.plugins import load_plugins

            load_plugins()
        return self._items

    def add(self, name: str, item: T) -> T:
        if name in self._items:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._items[name] = item
        return item

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator form of :meth:`add`."""

        def deco(item: T) -> T:
            return self.add(name, item)

        return deco

    def get(self, name: str) -> T:
        try:
            return self._ready()[name]
        except KeyError:
            raise ConfigError(self.unknown_message(name)) from None

    def unknown_message(self, name: str) -> str:
        known = sorted(self._ready())
        hint = nearest(name, known)
        msg = f"unknown {self.kind} {name!r}"
        if hint:
            msg += f"; did you mean {hint!r}?"
        return msg + f" Known {self.kind}s: {', '.join(known)}"

    def names(self) -> list[str]:
        return sorted(self._ready())

    def __contains__(self, name: object) -> bool:
        return name in self._ready()

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._ready()))

    def items(self) -> list[tuple[str, T]]:
        return sorted(self._ready().items())
