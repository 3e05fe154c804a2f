"""Spec §6: chunk headers and payload checksums, §6.2's order of DATA chunks, and the rule a
stream's kind sets on a chunk's ``Payload_Length`` (§10.1 step 3)."""
from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import NamedTuple, Sequence

from .. import limits as L
from ..errors import fail
from .checksum import crc32

CHUNK_TAG = b"TQCK"
CHUNK_HEADER_SIZE = 32
CHUNK_DATA = 0x0001  # spec §6.1
ANCILLARY_BIT = 0x8000

_CHUNK = struct.Struct("<4sHHIIIIII")


@dataclass(frozen=True)
class ChunkHeader:
    chunk_type: int
    stream: int
    tensor_index: int
    sequence: int
    item_count: int
    payload_length: int
    payload_crc: int

    @property
    def ancillary(self) -> bool:
        return bool(self.chunk_type & ANCILLARY_BIT)


def pack_chunk(tensor_index: int, stream: int, sequence: int, item_count: int, payload: bytes,
               chunk_type: int = CHUNK_DATA) -> bytes:
    body = _CHUNK.pack(CHUNK_TAG, chunk_type, stream, tensor_index, sequence, item_count,
                       len(payload), crc32(payload), 0)[:28]
    return body + struct.pack("<I", crc32(body)) + payload


def parse_chunk_header(data: bytes) -> ChunkHeader:
    """Spec §6 and §6.1: a chunk header's CRC first, then its type."""
    tag, ctype, stream, tidx, seq, count, plen, pcrc, hcrc = _CHUNK.unpack(data)
    if tag != CHUNK_TAG:
        raise fail("BAD_CHUNK", f"expected a chunk tag, found {tag!r}")
    if crc32(data[:28]) != hcrc:
        raise fail("CHECKSUM_MISMATCH", "chunk header CRC32 does not match")
    if not ctype & ANCILLARY_BIT and ctype != CHUNK_DATA:
        raise fail("UNKNOWN_CHUNK", f"critical chunk type 0x{ctype:04x} is not known to this reader")
    if plen > L.MAX_CHUNK_PAYLOAD:
        raise fail("LIMIT_EXCEEDED", f"chunk Payload_Length {plen} over 2^28")
    if not ctype & ANCILLARY_BIT and count > L.MAX_CHUNK_ITEMS:
        raise fail("LIMIT_EXCEEDED", f"chunk Item_Count {count} over 2^26")
    return ChunkHeader(ctype, stream, tidx, seq, count, plen, pcrc)


class PayloadKind(enum.Enum):
    """What a stream's chunk payloads are, which fixes the mode's rule on ``Payload_Length``
    (spec §10.1 step 3, checked from the chunk header, ``BAD_CHUNK``)."""

    BYTES = "bytes"  # the items themselves: Payload_Length == Item_Count (§7.2 none, §7.5.2 stream 0, §7.S.3)
    SYMBOLS = "symbols"  # range-coded 32-bit words: a positive multiple of 4 (§7.3.2, §7.5.2 bands, §7.S.4)
    ZSTD = "zstd"  # one zstd frame: no rule on the length (§7.2; a short frame is BAD_PAYLOAD)


class StreamSpec(NamedTuple):
    """One stream of a tensor as its mode lays it out (spec §7): its item count and its kind.
    The container reader sees a mode only through these."""

    items: int
    kind: PayloadKind


def check_payload_length(h: ChunkHeader, kind: PayloadKind) -> None:
    """Spec §10.1 step 3: the mode's rule on a DATA chunk's ``Payload_Length``, from the header
    alone (after the order and count rules, before the payload is read), ``BAD_CHUNK``."""
    n = h.payload_length
    if kind is PayloadKind.BYTES and n != h.item_count:
        raise fail("BAD_CHUNK", f"chunk of tensor {h.tensor_index} stream {h.stream}: Payload_Length {n} "
                                f"differs from Item_Count {h.item_count} (they must be equal)")
    if kind is PayloadKind.SYMBOLS and (n % 4 or n == 0):
        raise fail("BAD_CHUNK", f"chunk of tensor {h.tensor_index} stream {h.stream}: range-coded "
                                f"Payload_Length {n} is not a positive multiple of 4")


def check_payload(header: ChunkHeader, payload: bytes) -> None:
    if crc32(payload) != header.payload_crc:
        raise fail("CHECKSUM_MISMATCH", f"payload CRC32 of a chunk of tensor {header.tensor_index} does not match")


class ChunkOrder:
    """Spec §6.2: the order and counts of DATA chunks, checked chunk by chunk. ``layouts[t][s]``:
    the item count of tensor t's stream s."""

    def __init__(self, layouts: Sequence[Sequence[int]]):
        self.layouts = layouts
        self.tensor = 0
        self.stream = 0
        self.sequence = 0
        self.items = 0
        self._skip_complete()

    def _complete(self, t: int, s: int, items: int) -> bool:
        return items == self.layouts[t][s]

    def _skip_complete(self) -> None:
        """Move past streams (and tensors) that need no (more) chunks."""
        while self.tensor < len(self.layouts):
            layout = self.layouts[self.tensor]
            while self.stream < len(layout) and self.items == layout[self.stream]:
                self.stream += 1
                self.sequence = 0
                self.items = 0
            if self.stream < len(layout):
                return
            self.tensor += 1
            self.stream = 0
            self.sequence = 0
            self.items = 0

    @property
    def done(self) -> bool:
        return self.tensor >= len(self.layouts)

    def accept(self, h: ChunkHeader) -> bool:
        """Check ``h`` is the next DATA chunk; True if it completes its tensor."""
        if self.done:
            raise fail("BAD_CHUNK", f"DATA chunk for tensor {h.tensor_index} after every tensor is complete")
        if h.tensor_index != self.tensor or h.stream != self.stream or h.sequence != self.sequence:
            raise fail("BAD_CHUNK", f"chunk out of order: got tensor {h.tensor_index} stream {h.stream} "
                                    f"sequence {h.sequence}, expected tensor {self.tensor} stream "
                                    f"{self.stream} sequence {self.sequence}")
        if h.item_count < 1:
            raise fail("BAD_CHUNK", f"chunk of tensor {h.tensor_index} has Item_Count 0")
        need = self.layouts[self.tensor][self.stream] - self.items
        if h.item_count > need:
            raise fail("BAD_CHUNK", f"chunks of tensor {h.tensor_index} stream {h.stream} hold more items "
                                    f"than the {self.layouts[self.tensor][self.stream]} declared")
        self.items += h.item_count
        self.sequence += 1
        before = self.tensor
        self._skip_complete()
        return self.tensor != before

