"""Mode ``raw`` (spec §7.2): the tensor's exact bytes, optionally one zstd frame per chunk."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import zstandard

from ..errors import fail
from ..format.chunks import PayloadKind, StreamSpec
from ..format.dtypes import STORAGE
from ..format.manifest import TensorRecord
from ..format.zstdframe import decompress_frame
from .base import Chunks, Encoded, check_keys

CODECS = ("none", "zstd")
CHUNK_BYTES = 1 << 22  # encoder choice: 4 MiB of tensor bytes per chunk


@dataclass(frozen=True)
class Params:
    codec: str


def parse(record: TensorRecord) -> Params:
    """Spec §7.2.1: one key, ``codec``, ``none`` or ``zstd``."""
    codec = check_keys(record, {"codec": str})["codec"]
    if codec not in CODECS:
        raise fail("BAD_TENSOR_RECORD", f"tensor {record.name!r}: raw codec {codec!r} is not one of {CODECS}")
    return Params(codec)


def stream_items(p: Params, index: int, records: Sequence[TensorRecord]) -> tuple[StreamSpec, ...]:
    """Spec §7.2: stream 0 the tensor's bytes, as they are (``none``) or one zstd frame per chunk."""
    record = records[index]
    kind = PayloadKind.BYTES if p.codec == "none" else PayloadKind.ZSTD
    return (StreamSpec(record.numel * record.itemsize, kind),)


def symbol_tables(p: Params) -> tuple[None]:
    """No stream is range-coded."""
    return (None,)


def parts(p: Params, record: TensorRecord, streams: list[Chunks]) -> dict:
    """``values``: the tensor's storage array (exact)."""
    return {"codec": p.codec, "values": decode(p, record, streams)}


def decode(p: Params, record: TensorRecord, streams: list[Chunks]) -> np.ndarray:
    """Spec §7.2: concatenate stream 0, decompressing each chunk with its declared bound."""
    codec = p.codec
    parts = []
    for count, payload in streams[0]:
        if codec == "none":
            if len(payload) != count:  # the reader checked it from the header; kept for direct callers
                raise fail("BAD_CHUNK", f"tensor {record.name!r}: raw chunk of {len(payload)} bytes "
                                        f"declares {count} items")
            parts.append(payload)
        else:
            parts.append(_decompress(payload, count, record.name))
    data = b"".join(parts)
    arr = np.frombuffer(data, dtype=np.uint8 if record.dtype == "bool" else STORAGE[record.dtype])
    if record.dtype == "bool":
        if arr.size and arr.max() > 1:
            raise fail("BAD_PAYLOAD", f"tensor {record.name!r}: bool byte other than 0 or 1")
        arr = arr.view(np.bool_)
    return arr.reshape(record.shape)


def _decompress(payload: bytes, count: int, name: str) -> bytes:
    """Spec §7.2's order: frame header, content size against ``count``, window limit, blocks."""
    return decompress_frame(payload, what=f"tensor {name!r}", bad="BAD_PAYLOAD", size=count)


def write(arr: np.ndarray, codec: str = "zstd", level: int = 9) -> Encoded:
    """Spec §7.2: a storage array's bytes in chunks of 4 MiB of tensor bytes, each one zstd frame
    (``codec`` zstd) or as they are (``none``)."""
    data = np.ascontiguousarray(arr).tobytes()
    chunks = []
    cctx = zstandard.ZstdCompressor(level=level, write_content_size=True, threads=0) if codec == "zstd" else None
    for start in range(0, len(data), CHUNK_BYTES):
        piece = data[start:start + CHUNK_BYTES]
        chunks.append((len(piece), cctx.compress(piece) if cctx else piece))
    return Encoded("raw", {"codec": codec}, [chunks])


def encode(arr: np.ndarray) -> Encoded:
    """The raw encoder: zstd where it saves bytes, else uncompressed."""
    packed = write(arr, "zstd")
    if sum(len(p) for _, p in packed.streams[0]) >= arr.nbytes:
        return write(arr, "none")
    return packed
