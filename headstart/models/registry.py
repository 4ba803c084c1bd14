"""A registry: names to the descriptions of what they build (backbones, training strategies)."""

from __future__ import annotations

import difflib
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(dict[str, T], Generic[T]):
    """{name: info}, each name registered once, looked up with an error that lists the names."""

    def __init__(self, what: str) -> None:
        super().__init__()
        self.what = what

    def register(self, name: str, info: T) -> T:
        if name in self:
            raise ValueError(f"{self.what} {name!r} is already registered")
        self[name] = info
        return info

    def lookup(self, name: str) -> T:
        try:
            return self[name]
        except KeyError:
            close = difflib.get_close_matches(name, self, n=3, cutoff=0.5)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise ValueError(f"unknown {self.what} {name!r}.{hint} Available: {', '.join(sorted(self))}") from None
