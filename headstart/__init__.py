"""headstart: transfer learning on folders of labelled images.

    from headstart.training import TrainConfig, train
    result = train("data/", out="runs/x", config=TrainConfig(strategy="frozen"))

Modules, one per noun (the README's "Library" section has the table): cli; training, strategies,
runstate, runfolder; evaluation, prediction, convert, check, demo, report, plots; inference,
metrics, features; models, weights, checkpoint, formats; data, preprocessing, runtime, engine, kernels.
"""

__version__ = "0.1.0"
