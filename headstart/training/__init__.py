"""Training: the options (config.py), the epoch loop that writes a run's checkpoints and state
(loop.py), the strategies (strategies/, one file each, registered in registry.py), one epoch
(epochs.py), the optimizer (optim.py), what a person watches and what stops a run (callbacks.py),
interrupts (interrupts.py), and the whole run (run.py: `train`, `resume`)."""

from headstart.training.callbacks import Callback, EarlyStopping, Run, StopAtBudget
from headstart.training.config import TrainConfig
from headstart.training.interrupts import RankLost, StopOnSignal, StopRequested, TrainingDiverged, TrainingInterrupted
from headstart.training.loop import RunResult, fit, stopping_callbacks
from headstart.training.registry import STRATEGIES, StrategyInfo, get_strategy, register_strategy
from headstart.training.run import resume, train
from headstart.training.strategies import Strategy

__all__ = ["STRATEGIES", "Callback", "EarlyStopping", "RankLost", "Run", "RunResult", "StopAtBudget", "StopOnSignal",
           "StopRequested", "Strategy", "StrategyInfo", "TrainConfig", "TrainingDiverged", "TrainingInterrupted", "fit",
           "get_strategy", "register_strategy", "resume", "stopping_callbacks", "train"]
