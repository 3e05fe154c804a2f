"""Mode ``alias`` (spec §7.4): a tensor that is an earlier tensor (tied weights stored once).
The reader resolves an alias to its target; it has no streams and nothing to decode."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from ..errors import fail
from ..format.chunks import StreamSpec
from ..format.manifest import TensorRecord
from .base import Encoded, check_keys


@dataclass(frozen=True)
class Params:
    of: int


def parse(record: TensorRecord) -> Params:
    """Spec §7.4.1's key rule (the target's checks need the other records: :func:`stream_items`)."""
    return Params(check_keys(record, {"of": int})["of"])


def stream_items(p: Params, index: int, records: Sequence[TensorRecord]) -> tuple[StreamSpec, ...]:
    """Spec §7.4: ``of`` names an earlier tensor that is no alias, of the same dtype and shape."""
    record = records[index]
    j = p.of
    if not 0 <= j < index:
        raise fail("BAD_TENSOR_RECORD", f"alias {record.name!r} refers to tensor {j}, not an earlier one")
    other = records[j]
    if other.mode == "alias" or other.dtype != record.dtype or other.shape != record.shape:
        raise fail("BAD_TENSOR_RECORD", f"alias {record.name!r} refers to {other.name!r}, "
                                        "which is an alias or differs in dtype or shape")
    return ()


def symbol_tables(p: Params) -> tuple[()]:
    """No streams."""
    return ()


def write(of: int) -> Encoded:
    """An alias of tensor ``of``."""
    return Encoded("alias", {"of": int(of)}, [])
