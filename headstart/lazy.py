"""Names a package exports without importing them (PEP 562): the package's `__getattr__` imports the
module that defines a name on first use, so that importing the package, or one of its light
modules, loads nothing heavy (torch)."""

from __future__ import annotations

import importlib
import sys
from typing import Any, Callable


def lazy_exports(package: str, where: dict[str, str]) -> Callable[[str], Any]:
    """`package`'s module `__getattr__`: `name` is `<package>.<where[name]>.<name>`, imported on first
    use and kept in the package."""
    def __getattr__(name: str) -> Any:
        if name not in where:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{where[name]}"), name)
        setattr(sys.modules[package], name, value)
        return value

    return __getattr__
