"""Where and how networks run: the device, precision and engine (device.py: `Runtime`,
`resolve_runtime`), OpenVINO (openvino.py), files written by `headstart export` (exported.py),
data-parallel ranks (distributed.py), inference over a dataset (inference.py), backbone features and
their disk cache (features.py), and the clock that times a run and estimates it (clock.py).

`from headstart.runtime import Runtime` imports device.py (and torch) on first use only: clock.py's
readers (`headstart report`) load no torch."""

from __future__ import annotations

from typing import Any

_WHERE = dict.fromkeys(["ENGINES", "PRECISIONS", "Runtime", "resolve_runtime"], "device")
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'headstart.runtime' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f"headstart.runtime.{_WHERE[name]}"), name)
    globals()[name] = value
    return value
