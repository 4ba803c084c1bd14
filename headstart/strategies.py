"""The old import path (until headstart 0.2): the strategies are headstart.training.strategies (a file
each), the optimizer training.optim, one epoch training.epochs."""
from headstart.training.epochs import (StagesFrom, freeze_below, set_train_mode, time_training_steps,
                                       train_head_one_epoch, train_one_epoch)
from headstart.training.optim import Stepper, class_weights, make_scheduler
from headstart.training.strategies import *  # noqa: F401,F403
from headstart.training.strategies import __all__ as _strategies

__all__ = [*_strategies, "StagesFrom", "Stepper", "class_weights", "freeze_below", "make_scheduler", "set_train_mode",
           "time_training_steps", "train_head_one_epoch", "train_one_epoch"]
