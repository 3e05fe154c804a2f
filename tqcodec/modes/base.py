"""What every coding mode of spec §7 shares: the one name for an encoded tensor, the interface
a mode offers, and the parameter rules common to the modes (spec §7.S.1)."""
from __future__ import annotations

from typing import Any, NamedTuple, Optional, Protocol, Sequence

import numpy as np

from ..errors import fail
from ..format.chunks import StreamSpec
from ..format.dtypes import FLOAT_NAMES
from ..format.manifest import TensorRecord

Chunks = list[tuple[int, bytes]]
"""One stream's chunks: ``(Item_Count, payload)`` in order (spec §6)."""


class Encoded(NamedTuple):
    """One tensor as a coding mode writes it: the mode's name, its ``params`` (the manifest's
    Tensor_Record params, spec §5.3) and its streams (``streams[s]``: stream s's chunks)."""

    mode: str
    params: dict
    streams: list[Chunks]


class Mode(Protocol):
    """A coding mode of spec §7 (each module of ``tqcodec.modes`` is one):

    - ``parse(record) -> Params``: the mode's parameter rules (spec §7.x.1) in the spec's order,
      a frozen value; ``TqzError`` for every rule a file can break, never another exception;
    - ``stream_items(params, index, records) -> tuple[StreamSpec, ...]``: each stream's item count
      and payload kind (``format.chunks.PayloadKind``: the rule on its chunks' ``Payload_Length``
      that the container reader checks from each chunk header, spec §10.1 step 3);
    - ``decode(params, record, streams) -> np.ndarray``: the tensor's storage array;
    - ``parts(params, record, streams) -> dict``: the decoded integer stage (levels, steps,
      codebooks: what training and transform-domain layers work on), with the same checks;
    - ``symbol_tables(params) -> tuple``: each stream's range-coder table, or None for a stream
      that is not range-coded (so a decoder can hand the range decoding to other processes).
    """

    def parse(self, record: TensorRecord) -> Any: ...

    def stream_items(self, params: Any, index: int, records: Sequence[TensorRecord]) -> tuple[StreamSpec, ...]: ...

    def decode(self, params: Any, record: TensorRecord, streams: list[Chunks]) -> np.ndarray: ...

    def parts(self, params: Any, record: TensorRecord, streams: list[Chunks]) -> dict: ...

    def symbol_tables(self, params: Any) -> tuple[Optional[np.ndarray], ...]: ...


# --- parameter rules shared by the modes ------------------------------------------------------

def _is_int(v: Any) -> bool:
    return type(v) is int  # msgpack integers; a bool is not one (spec §5.1)


_TYPES = {int: _is_int, str: lambda v: isinstance(v, str), bytes: lambda v: isinstance(v, bytes),
          list: lambda v: isinstance(v, list)}


def check_keys(record: TensorRecord, required: dict[str, type], optional: Optional[dict[str, type]] = None,
               elements: Optional[dict[str, type]] = None) -> dict:
    """A mode's rule 1: the required keys present, no key but the ``optional`` ones, the value
    types (``elements``: the element type of array keys). ``BAD_TENSOR_RECORD``."""
    name = record.name
    p = record.params
    optional = optional or {}
    missing = [k for k in required if k not in p]
    if missing:
        raise fail("BAD_TENSOR_RECORD", f"tensor {name!r}: mode {record.mode} needs params {missing}")
    unknown = sorted(k for k in p if k not in required and k not in optional)
    if unknown:
        raise fail("BAD_TENSOR_RECORD", f"tensor {name!r}: unknown params {unknown} for mode {record.mode}")
    for key, typ in {**required, **optional}.items():
        if key in p and not _TYPES[typ](p[key]):
            raise fail("BAD_TENSOR_RECORD", f"tensor {name!r}: params[{key!r}] is not {typ.__name__}")
    for key, typ in (elements or {}).items():
        if key in p and not all(_TYPES[typ](v) for v in p[key]):
            raise fail("BAD_TENSOR_RECORD", f"tensor {name!r}: the elements of params[{key!r}] must be "
                                            f"{'integers' if typ is int else 'bins'}")
    return p


def check_float(record: TensorRecord, rows: bool) -> None:
    """A float dtype and at least one element (and one dimension when ``rows``)."""
    if record.dtype not in FLOAT_NAMES:
        raise fail("BAD_TENSOR_RECORD", f"tensor {record.name!r}: mode {record.mode} needs a float dtype, "
                                        f"not {record.dtype}")
    if record.numel < 1 or (rows and len(record.shape) < 1):
        raise fail("BAD_TENSOR_RECORD", f"tensor {record.name!r}: mode {record.mode} needs at least one "
                                        f"{'dimension and ' if rows else ''}element")


def row_view(shape: Sequence[int]) -> tuple[int, int]:
    """Spec §7.S.1: ``(n, m)`` = (shape[0], numel / n) of a tensor with >= 1 dimension and
    element (the encoders' 0-d tensors: (1, 1))."""
    if not len(shape):
        return 1, 1
    n = int(shape[0])
    numel = 1
    for d in shape:
        numel *= int(d)
    return n, numel // n
