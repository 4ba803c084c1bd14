"""Where and how networks run: the device, precision and engine (device.py: `Runtime`,
`resolve_runtime`), OpenVINO (openvino.py), files written by `headstart export` (exported.py),
data-parallel ranks (distributed.py), inference over a dataset (inference.py), backbone features and
their disk cache (features.py), and the clock that times a run and estimates it (clock.py).

`from headstart.runtime import Runtime` imports device.py (and torch) on first use only: clock.py's
readers (`headstart report`) load no torch."""

from __future__ import annotations

from headstart.lazy import lazy_exports

_WHERE = dict.fromkeys(["ENGINES", "PRECISIONS", "Runtime", "resolve_runtime"], "device")
__all__ = sorted(_WHERE)
__getattr__ = lazy_exports(__name__, _WHERE)
