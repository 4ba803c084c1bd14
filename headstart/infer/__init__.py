"""A trained model, opened once and run one way: `load` (opening.py: the one place that decides how it
runs) gives a `Classifier` (classifier.py) that decodes images once (decode.py) and answers them;
`predict` (prediction.py), `evaluate` (evaluation.py) and `find_similar` (similar.py) go through it."""

from headstart.infer.classifier import Classifier, Prediction
from headstart.infer.decode import ImageLike, check_top_k, decode_image
from headstart.infer.evaluation import evaluate
from headstart.infer.opening import load
from headstart.infer.prediction import predict

__all__ = ["Classifier", "ImageLike", "Prediction", "check_top_k", "decode_image", "evaluate", "load", "predict"]
