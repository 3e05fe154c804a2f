"""Mode ``alias`` (spec §7.4): a tensor that is an earlier tensor (tied weights stored once)."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from ..errors import fail
from ..format.manifest import TensorRecord, check_record_value_types


def target(index: int, record: TensorRecord, records: Sequence[TensorRecord]) -> int:
    """Spec §7.4: the index this alias refers to, checked."""
    check_record_value_types(record.params, [("of", int)], record.name)
    j = record.params["of"]
    if not 0 <= j < index:
        raise fail("BAD_TENSOR_RECORD", f"alias {record.name!r} refers to tensor {j}, not an earlier one")
    other = records[j]
    if other.mode == "alias" or other.dtype != record.dtype or other.shape != record.shape:
        raise fail("BAD_TENSOR_RECORD", f"alias {record.name!r} refers to {other.name!r}, "
                                        "which is an alias or differs in dtype or shape")
    return j


def stream_items(index: int, record: TensorRecord, records: Sequence[TensorRecord]) -> tuple[int, ...]:
    target(index, record, records)
    return ()


def decode(record: TensorRecord, streams: list) -> np.ndarray:
    raise RuntimeError("alias tensors are resolved by the reader, not decoded")


def encode_params(of: int) -> dict:
    return {"of": int(of)}
