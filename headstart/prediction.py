"""The old import path (until headstart 0.2): use headstart.infer."""
from headstart.infer import Prediction, predict

__all__ = ["Prediction", "predict"]
