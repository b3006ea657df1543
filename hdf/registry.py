"""Named things of one kind (backbones, datasets, strategies, DRO modes), filled at import time
and looked up by the name a config gives.

One helper for every registry, so each says the same thing when a name is taken twice or not
known: the unknown name, every known one, and how to choose another.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

T = TypeVar("T")
S = TypeVar("S")


class Registry(Mapping[str, T]):
    """A read-only mapping name -> registered object, plus `register` / `add` and `lookup`."""

    def __init__(self, kind: str, fix: str) -> None:
        self.kind = kind  # what is registered, for messages ("backbone")
        self.fix = fix  # how a config names one ("set model.backbone=<name>")
        self._items: dict[str, T] = {}

    def add(self, name: str, obj: Any) -> None:
        """Register `obj` under `name`; the same object again is a no-op, another one an error."""
        if self._items.get(name, obj) is not obj:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._items[name] = obj

    def register(self, name: str) -> Callable[[S], S]:
        """Decorator form of `add`: returns what it decorates unchanged."""

        def wrap(obj: S) -> S:
            self.add(name, obj)
            return obj

        return wrap

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._items)

    def lookup(self, name: str) -> T:
        """The object registered as `name`; an unknown name is a ValueError listing the known."""
        try:
            return self._items[name]
        except KeyError:
            known = ", ".join(self.names()) or "(none registered)"
            raise ValueError(f"unknown {self.kind} {name!r}; known: {known} ({self.fix})") from None

    def __getitem__(self, name: str) -> T:
        return self._items[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)
