"""Mode ``raw`` (spec §7.2): the tensor's exact bytes, optionally one zstd frame per chunk."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import zstandard

from ..dtypes import STORAGE
from ..errors import fail
from ..format.manifest import TensorRecord, check_record_value_types

CODECS = ("none", "zstd")
CHUNK_BYTES = 1 << 22  # encoder choice: 4 MiB of tensor bytes per chunk


def stream_items(index: int, record: TensorRecord, records: Sequence[TensorRecord]) -> tuple[int, ...]:
    check_record_value_types(record.params, [("codec", str)], record.name)
    if record.params["codec"] not in CODECS:
        raise fail("BAD_TENSOR_RECORD", f"tensor {record.name!r}: raw codec {record.params['codec']!r} "
                                        f"is not one of {CODECS}")
    return (record.numel * record.itemsize,)


def decode(record: TensorRecord, streams: list[list[tuple[int, bytes]]]) -> np.ndarray:
    """Spec §7.2: concatenate stream 0, decompressing each chunk with its declared bound."""
    codec = record.params["codec"]
    parts = []
    for count, payload in streams[0]:
        if codec == "none":
            if len(payload) != count:
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
    try:
        params = zstandard.get_frame_parameters(payload)
    except zstandard.ZstdError as exc:
        raise fail("BAD_PAYLOAD", f"tensor {name!r}: not a zstd frame ({exc})") from None
    if params.content_size not in (zstandard.CONTENTSIZE_UNKNOWN, count):
        raise fail("BAD_PAYLOAD", f"tensor {name!r}: zstd frame declares {params.content_size} bytes, "
                                  f"chunk declares {count}")
    if params.window_size > 1 << 27:
        # spec §7.2 / §12: a window over 2^27 (also libzstd's default decoder limit)
        raise fail("LIMIT_EXCEEDED", f"tensor {name!r}: zstd frame declares a {params.window_size}-byte "
                                     "window (the limit is 2^27)")
    try:
        # the frame's declared size was checked above, so max_output_size bounds every case
        out = zstandard.ZstdDecompressor().decompress(payload, max_output_size=count,
                                                      allow_extra_data=False)
    except zstandard.ZstdError as exc:
        raise fail("BAD_PAYLOAD", f"tensor {name!r}: corrupt zstd frame ({exc})") from None
    if len(out) != count:
        raise fail("BAD_PAYLOAD", f"tensor {name!r}: zstd frame gives {len(out)} bytes, chunk declares {count}")
    return out


def encode(arr: np.ndarray, codec: str = "zstd", level: int = 9) -> tuple[dict, list[list[tuple[int, bytes]]]]:
    """Spec §7.2 encoder: params and stream 0's chunks (4 MiB of tensor bytes each)."""
    data = np.ascontiguousarray(arr).tobytes()
    chunks = []
    cctx = zstandard.ZstdCompressor(level=level, write_content_size=True, threads=0) if codec == "zstd" else None
    for start in range(0, len(data), CHUNK_BYTES):
        piece = data[start:start + CHUNK_BYTES]
        chunks.append((len(piece), cctx.compress(piece) if cctx else piece))
    return {"codec": codec}, [chunks]
