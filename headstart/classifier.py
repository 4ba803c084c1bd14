"""The old import path (until headstart 0.2): use headstart.infer."""
from headstart.infer import Classifier, ImageLike, Prediction, check_top_k, load

__all__ = ["Classifier", "ImageLike", "Prediction", "check_top_k", "load"]
