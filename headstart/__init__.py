"""headstart: transfer learning on labelled images (class folders, or a table of labels).

    from headstart import TrainConfig, load, train
    result = train("data/", out="runs/x", config=TrainConfig(strategy="frozen"))
    model = load(result.best_checkpoint)          # a Classifier: the one way a trained model runs
    model.predict("photo.jpg")                    # Prediction(label, probability, top_k, ...)

`load`, `train`, `resume` and `TrainConfig` are imported on first use (importing headstart itself
loads neither torch nor the models). Modules, one per noun (the README's "Library" section has the
table): cli; training, strategies, runstate, runfolder; classifier (load), prediction, evaluation,
export, exported, int8, serve, convert, check, demo, report, plots; inference, metrics, features;
models, weights, checkpoint, formats; data, preprocessing, runtime, engine, kernels.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["Classifier", "Prediction", "TrainConfig", "load", "resume", "train", "__version__"]

_LAZY = {"load": "classifier", "Classifier": "classifier", "Prediction": "classifier",
         "train": "training", "resume": "training", "TrainConfig": "training"}

if TYPE_CHECKING:
    from .classifier import Classifier, Prediction, load
    from .training import TrainConfig, resume, train


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'headstart' has no attribute {name!r}")
