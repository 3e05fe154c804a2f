"""The closed registry of coding modes (spec §7).

A mode is looked up by the exact name stored in the file; nothing is ever resolved by
importing a name. Each mode module offers:

- ``stream_items(index, record, records) -> tuple[int, ...]``: checks the record's params
  (spec §7.x rules) and returns the item count of each of its streams;
- ``decode(record, streams) -> np.ndarray``: the tensor's storage array (see ``tqcodec.dtypes``)
  from its chunks' payloads, ``streams[s] = [(Item_Count, payload), ...]``.
"""
from __future__ import annotations

from types import ModuleType
from typing import Sequence

import numpy as np

from ..errors import fail
from ..format.manifest import TensorRecord
from . import alias, dither, ecsq, kmeans, pq, raw, tq, uniform

MODES: dict[str, ModuleType] = {"raw": raw, "uniform": uniform, "alias": alias, "tq": tq,
                                "ecsq": ecsq, "kmeans": kmeans, "pq": pq, "dither": dither}


def mode_of(record: TensorRecord) -> ModuleType:
    try:
        return MODES[record.mode]
    except KeyError:
        raise fail("UNKNOWN_MODE", f"tensor {record.name!r} uses coding mode {record.mode!r}, "
                                   f"unknown to this reader (known: {', '.join(MODES)})") from None


def stream_items(index: int, record: TensorRecord, records: Sequence[TensorRecord]) -> tuple[int, ...]:
    """The ``StreamLayout`` of the container: validates params, returns stream item counts."""
    return mode_of(record).stream_items(index, record, records)


def decode(record: TensorRecord, streams: list[list[tuple[int, bytes]]]) -> np.ndarray:
    return mode_of(record).decode(record, streams)
