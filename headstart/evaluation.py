"""The old import path (until headstart 0.2): use headstart.infer.evaluation."""
from headstart.infer.evaluation import METRICS_JSON, evaluate, write_metrics_json

__all__ = ["METRICS_JSON", "evaluate", "write_metrics_json"]
