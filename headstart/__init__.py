"""headstart: transfer learning on folders of labelled images.

    from headstart.training import TrainConfig, train
    result = train("data/", out="runs/x", config=TrainConfig(strategy="frozen"))

Modules, one per noun: data, preprocessing, models, weights, runtime, training, evaluation,
prediction, checkpoint, plots, demo, cli.
"""

__version__ = "0.1.0"
