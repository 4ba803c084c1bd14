"""headstart: transfer learning on labelled images (class folders, or a table of labels).

    from headstart import TrainConfig, load, train
    result = train("data/", out="runs/x", config=TrainConfig(strategy="frozen"))
    model = load(result.best_checkpoint)          # a Classifier: the one way a trained model runs
    model.predict("photo.jpg")                    # Prediction(label, probability, top_k, ...)

`load`, `train`, `resume` and `TrainConfig` are imported on first use (importing headstart itself
loads neither torch nor the models). The subpackages, each importing only those below it
(ARCHITECTURE.md; checked by `lint-imports`):

    cli                      one file per command: parse, call one library function, print
    serve, demo              the prediction service; the tutorial end to end
    infer                    load -> Classifier: the one way a trained model runs; predict, evaluate, similar
    training, export         TrainConfig, the loop, the strategies, train/resume; ONNX/OpenVINO, the gate, int8
    report                   a run's pictures and report.html
    analysis                 the dataset check, metrics, calibration, unknown images, label issues
    runtime                  device and precision, OpenVINO, exported files, ranks, inference, features
    models                   the backbones, their registry and kernels
    io                       downloads, safe writes, formats, checkpoints, weights, the run folder
    data                     folders and tables of labels, images, transforms, loaders
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from headstart.lazy import lazy_exports
from headstart.version import __version__

__all__ = ["Classifier", "Prediction", "TrainConfig", "load", "resume", "train", "__version__"]

_LAZY = {"load": "infer.opening", "Classifier": "infer.classifier", "Prediction": "infer.classifier",
         "train": "training.run", "resume": "training.run", "TrainConfig": "training.config"}

if TYPE_CHECKING:
    from headstart.infer.classifier import Classifier, Prediction
    from headstart.infer.opening import load
    from headstart.training.config import TrainConfig
    from headstart.training.run import resume, train

__getattr__ = lazy_exports(__name__, _LAZY)
