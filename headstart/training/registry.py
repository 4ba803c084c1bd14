"""The strategies' registry: `headstart train --strategy NAME` runs what `register_strategy` added
(the built-in ones are registered in strategies/__init__.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from headstart.models.registry import Registry


@dataclass(frozen=True)
class StrategyInfo:
    name: str
    build: Callable[..., Any]  # (model, splits, *, config, preprocessing, runtime, callback, skip, started)
    momentum: float  # the default SGD momentum (the tutorial's)
    description: str  # one line, for --help
    holds_weights: bool = True  # the run state holds every weight (else resume rebuilds them from config.weights)
    compiles: bool = False  # --compile applies (torch.compile of the network that trains)


STRATEGIES: Registry[StrategyInfo] = Registry("strategy")


def register_strategy(info: StrategyInfo) -> StrategyInfo:
    """Add a strategy (its name must be new); `headstart train --strategy NAME` then runs it."""
    return STRATEGIES.register(info.name, info)


def get_strategy(name: str) -> StrategyInfo:
    return STRATEGIES.lookup(name)
