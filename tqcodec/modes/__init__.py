"""The coding modes of spec §7, each in its own module with its parameters, decoder, writer and
encoder together (``base.Mode`` is the interface). The registry is closed: a mode is looked up
by the exact name a file stores, nothing is ever resolved by importing a name.

Decoding imports each mode's format only; encoders (numerics) load when an encoder asks.
"""
from __future__ import annotations

from types import ModuleType
from typing import Any, Optional

import numpy as np

from ..errors import fail
from ..format.manifest import TensorRecord
from . import alias, dither, ecsq, kmeans, pq, raw, tq, uniform
from .base import Chunks, Encoded

MODES: dict[str, ModuleType] = {"raw": raw, "uniform": uniform, "alias": alias, "tq": tq,
                                "ecsq": ecsq, "kmeans": kmeans, "pq": pq, "dither": dither}


def mode_of(record: TensorRecord) -> ModuleType:
    """The module of ``record``'s mode (``UNKNOWN_MODE`` for a name this reader does not know)."""
    try:
        return MODES[record.mode]
    except KeyError:
        raise fail("UNKNOWN_MODE", f"tensor {record.name!r} uses coding mode {record.mode!r}, "
                                   f"unknown to this reader (known: {', '.join(MODES)})") from None


def decode(record: TensorRecord, streams: list[Chunks], params: Optional[Any] = None) -> np.ndarray:
    """The storage array of a (non-alias) record from its streams (``params``: its mode's parsed
    parameters, parsed here if not given)."""
    mode = mode_of(record)
    return mode.decode(mode.parse(record) if params is None else params, record, streams)


__all__ = ["MODES", "Chunks", "Encoded", "decode", "mode_of"]
