"""A trained model taken out: `export` (writers.py) writes ONNX or OpenVINO IR with its preprocessing,
checked by the parity gate (gate.py) on real images; `int8` makes and caches an NNCF-quantized copy
(int8.py); convert.py writes weights and checkpoints in other formats (`headstart convert`)."""

from headstart.export.gate import Parity, ParityError, documented_crop
from headstart.export.writers import FORMATS, PRECISIONS, Exported, export

__all__ = ["FORMATS", "PRECISIONS", "Exported", "Parity", "ParityError", "documented_crop", "export"]
