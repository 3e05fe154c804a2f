"""tqcodec: transform-quantization codec and the .tqz container for neural-network weights.

    import tqcodec
    tqcodec.save(model.state_dict(), "model.tqz")
    state = tqcodec.load("model.tqz")
    with tqcodec.open("model.tqz") as f:
        w = f.get_tensor("fc1.weight")

Importing ``tqcodec`` loads no torch: the names below that need it load on first use, so the
byte layer (``tqcodec.format``) stays cheap to import.
"""
from __future__ import annotations

import importlib
from typing import Any

from .errors import TqzError, TqzWarning
from .format.header import MAJOR_VERSION, MINOR_VERSION
from .limits import Limits

__version__ = "0.1.0"
FORMAT_VERSION = (MAJOR_VERSION, MINOR_VERSION)
"""The newest format version this package reads and writes (spec §13; a file declares the
lowest version that defines what it uses)."""

_LAZY = {
    "EncodeOptions": "api", "TensorInfo": "api", "TqzFile": "api", "VerifyReport": "api",
    "encode_bytes": "api", "iter_tensors": "api", "load": "api", "open": "api", "save": "api",
    "verify": "api", "Stats": "model.calibrate", "calibrate": "model.calibrate",
    "load_module": "model.nn", "finetune": "model.finetune",
}

__all__ = ["TqzError", "TqzWarning", "Limits", "EncodeOptions", "TensorInfo", "TqzFile", "VerifyReport",
           "encode_bytes", "iter_tensors", "load", "open", "save", "verify", "__version__",
           "FORMAT_VERSION", "Stats", "calibrate", "load_module", "finetune"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
