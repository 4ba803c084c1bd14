"""Training strategies: what trains, on what inputs, and what a run state holds of it; one file each.

- finetune (`FineTune`, the tutorial's): every parameter trains; SGD momentum 0.9.
- frozen (the tutorial's): only the head trains (SGD momentum 0.5): `HeadOnFeatures` on features
  computed once (the default), `HeadOnFrozenBackbone` with the backbone run every step.
- partial (`Partial`): the stages from --train-from up train with the head.
- gradual (`Gradual`): the head fitted on the features first, then as partial with a smaller
  learning rate for the backbone.
- auto (`Auto`): a fine-tune from the stage and for the epochs that fit --budget.

A new strategy is a new class and one `register_strategy` call; nothing else changes.
"""

from headstart.training.registry import STRATEGIES, StrategyInfo, get_strategy, register_strategy
from headstart.training.strategies.auto import Auto, Candidate, Plan, choose_backbone, choose_plan
from headstart.training.strategies.base import ImageEpochs, Strategy, cached_features, head_on_features
from headstart.training.strategies.finetune import FineTune
from headstart.training.strategies.frozen import HeadOnFeatures, HeadOnFrozenBackbone, HeadOnly, frozen_strategy
from headstart.training.strategies.partial import Gradual, Partial

register_strategy(StrategyInfo("finetune", FineTune, momentum=0.9, compiles=True,
                               description="train all layers"))
register_strategy(StrategyInfo("frozen", frozen_strategy, momentum=0.5, holds_weights=False,
                               description="train only the new head on the frozen backbone"))
register_strategy(StrategyInfo("partial", Partial, momentum=0.9,
                               description="train the stages from --train-from up (default: the last) and the head"))
register_strategy(StrategyInfo("gradual", Gradual, momentum=0.9,
                               description="fit the head on the backbone's features first, then train from "
                                           "--train-from with the backbone at --backbone-lr times the learning rate"))
register_strategy(StrategyInfo("auto", Auto, momentum=0.9,
                               description="a head fitted on the backbone's features first (epoch 0), then a "
                                           "fine-tune from the stage and for the epochs that fit --budget (no "
                                           "budget: every layer, every epoch); the best on validation is kept"))

__all__ = ["STRATEGIES", "Auto", "Candidate", "FineTune", "Gradual", "HeadOnFeatures", "HeadOnFrozenBackbone", "HeadOnly",
           "ImageEpochs", "Partial", "Plan", "Strategy", "StrategyInfo", "cached_features", "choose_backbone",
           "choose_plan", "get_strategy", "head_on_features", "register_strategy"]
