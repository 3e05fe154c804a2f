"""The byte structures of a .tqz file and the order in which they are read and written.

Spec §3 (header), §6 (chunks), §9 (index and footer), §10 (decoding procedure).
This module knows bytes, not numerics: a mode is visible to it only through
``StreamLayout``, the item counts of a tensor's streams.
"""
from __future__ import annotations

import os
import shutil
import struct
import tempfile
import threading
import zlib
from dataclasses import dataclass
from typing import BinaryIO, Callable, Iterator, Optional, Sequence

from .. import limits as L
from ..errors import fail
from .manifest import Manifest, TensorRecord, parse_manifest

MAGIC = b"\x89TQZ\r\n\x1a\n"
FOOTER_MAGIC = b"\x89TQZEND\n"
CHUNK_TAG = b"TQCK"
INDEX_TAG = b"TQIX"
MAJOR_VERSION = 1
MINOR_VERSION = 2  # the newest minor version this reader and writer implement
# Spec §13: a writer puts the lowest minor version that defines everything a file uses. Modes not
# listed here are from 1.0.
MODE_SINCE_MINOR = {"tq": 1, "ecsq": 2, "kmeans": 2, "pq": 2, "dither": 2}
HEADER_SIZE = 32
CHUNK_HEADER_SIZE = 32
FOOTER_SIZE = 32
INDEX_ENTRY_SIZE = 16
KNOWN_REQUIRED_FEATURES = 0  # spec §4: v1.0 defines none

CHUNK_DATA = 0x0001  # spec §6.1
ANCILLARY_BIT = 0x8000

_HEADER = struct.Struct("<8sHHIIIII")
_CHUNK = struct.Struct("<4sHHIIIIII")
_FOOTER = struct.Struct("<QIIII8s")
_SPAN = struct.Struct("<QQ")


def crc32(data: bytes) -> int:
    """Spec §1: CRC-32/ISO-HDLC."""
    return zlib.crc32(data) & 0xFFFFFFFF


# --- spec §3 header --------------------------------------------------------------------

@dataclass(frozen=True)
class Header:
    major: int
    minor: int
    required_features: int
    optional_features: int
    manifest_length: int
    manifest_crc: int


def pack_header(manifest: bytes, minor: int = MINOR_VERSION) -> bytes:
    """Spec §3: the 32-byte header for ``manifest``."""
    body = _HEADER.pack(MAGIC, MAJOR_VERSION, minor, 0, 0, len(manifest), crc32(manifest), 0)[:28]
    return body + struct.pack("<I", crc32(body))


def parse_header(data: bytes) -> Header:
    """Spec §3, checks in the order the spec gives. ``data`` is the file's first <= 32 bytes."""
    if len(data) < 8:
        if MAGIC.startswith(data):
            raise fail("TRUNCATED", f"file is {len(data)} bytes, shorter than a .tqz header")
        raise fail("BAD_MAGIC", "not a .tqz file (wrong magic)")
    if data[:8] != MAGIC:
        hint = " (looks like HTML)" if data.lstrip()[:1] == b"<" else ""
        raise fail("BAD_MAGIC", f"not a .tqz file (wrong magic){hint}")
    if len(data) < HEADER_SIZE:
        raise fail("TRUNCATED", f"file ends inside the header ({len(data)} of 32 bytes)")
    _, major, minor, req, opt, mlen, mcrc, hcrc = _HEADER.unpack(data[:HEADER_SIZE])
    if major != MAJOR_VERSION:
        raise fail("UNSUPPORTED_VERSION", f"format version {major}.{minor} (this reader knows major 1)")
    if crc32(data[:28]) != hcrc:
        raise fail("CHECKSUM_MISMATCH", "header CRC32 does not match")
    unknown = req & ~KNOWN_REQUIRED_FEATURES
    if unknown:
        bit = (unknown & -unknown).bit_length() - 1
        raise fail("UNKNOWN_REQUIRED_FEATURE", f"required feature bit {bit} is not known to this reader")
    if mlen < 1 or mlen > L.MAX_MANIFEST_LENGTH:
        raise fail("LIMIT_EXCEEDED", f"Manifest_Length {mlen} outside 1..2^26")
    return Header(major, minor, req, opt, mlen, mcrc)


# --- spec §6 chunks ----------------------------------------------------------------------

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


def check_payload(header: ChunkHeader, payload: bytes) -> None:
    if crc32(payload) != header.payload_crc:
        raise fail("CHECKSUM_MISMATCH", f"payload CRC32 of a chunk of tensor {header.tensor_index} does not match")


# --- spec §9 index and footer -------------------------------------------------------------

@dataclass(frozen=True)
class Footer:
    index_offset: int
    tensor_count: int
    index_crc: int
    manifest_length: int

    @property
    def index_length(self) -> int:
        return 4 + INDEX_ENTRY_SIZE * self.tensor_count


def pack_index(spans: Sequence[tuple[int, int]]) -> bytes:
    return INDEX_TAG + b"".join(_SPAN.pack(o, n) for o, n in spans)


def pack_footer(index_offset: int, index: bytes, tensor_count: int, manifest_length: int) -> bytes:
    body = struct.pack("<QIII", index_offset, tensor_count, crc32(index), manifest_length)
    return body + struct.pack("<I", crc32(body)) + FOOTER_MAGIC


def parse_footer(data: bytes) -> Footer:
    """Spec §9.2 (magic, then CRC; the equalities are checked by the caller)."""
    if len(data) < FOOTER_SIZE:
        raise fail("TRUNCATED", "file ends inside the footer")
    ioff, count, icrc, mlen, fcrc, magic = _FOOTER.unpack(data)
    if magic != FOOTER_MAGIC:
        raise fail("BAD_INDEX", "no footer at the end of the file")
    if crc32(data[:20]) != fcrc:
        raise fail("CHECKSUM_MISMATCH", "footer CRC32 does not match")
    return Footer(ioff, count, icrc, mlen)


def parse_index(data: bytes, count: int, index_crc: int) -> list[tuple[int, int]]:
    """Spec §9.1: ``count`` span entries after the tag, under the footer's CRC."""
    if crc32(data) != index_crc:
        raise fail("CHECKSUM_MISMATCH", "index CRC32 does not match")
    if data[:4] != INDEX_TAG:
        raise fail("BAD_INDEX", "index does not start with TQIX")
    return [_SPAN.unpack_from(data, 4 + INDEX_ENTRY_SIZE * i) for i in range(count)]


# --- the streams of a tensor, as its mode declares them -------------------------------------

StreamLayout = Callable[[int, TensorRecord, Sequence[TensorRecord]], tuple[int, ...]]
"""(tensor index, record, all records) -> item count of each stream; validates the mode's params."""


@dataclass
class TensorChunks:
    """A tensor's DATA chunks, grouped by stream (payloads CRC-checked)."""

    index: int
    record: TensorRecord
    streams: list[list[tuple[int, bytes]]]  # per stream: (Item_Count, payload)


class _ChunkOrder:
    """Spec §6.2: the order and counts of DATA chunks, checked chunk by chunk."""

    def __init__(self, layouts: Sequence[tuple[int, ...]]):
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


def _layouts(manifest: Manifest, layout: StreamLayout) -> list[tuple[int, ...]]:
    """Each tensor's stream item counts (spec §10.1 step 2: the mode's parameters).

    A mode that trips over hostile parameters with a Python or numpy exception instead of a
    TqzError still gives a TqzError (BAD_TENSOR_RECORD), never a traceback.
    """
    out = []
    for i, r in enumerate(manifest.tensors):
        try:
            out.append(layout(i, r, manifest.tensors))
        except (ValueError, TypeError, OverflowError, IndexError, KeyError, ArithmeticError,
                RecursionError) as exc:
            raise fail("BAD_TENSOR_RECORD", f"tensor {r.name!r}: parameters of mode {r.mode!r} are not "
                                            f"valid (unexpected {type(exc).__name__}: {exc})") from None
    return out


# --- spec §10.1 front to back ----------------------------------------------------------------

class _Stream:
    """Sequential reads from any binary file object, counting the position."""

    def __init__(self, fileobj: BinaryIO):
        self.f = fileobj
        self.pos = 0

    def read(self, n: int) -> bytes:
        parts = []
        left = n
        while left > 0:
            b = self.f.read(min(left, 1 << 24))
            if not b:
                break
            parts.append(b)
            left -= len(b)
        data = b"".join(parts)
        self.pos += len(data)
        return data

    def read_exact(self, n: int, what: str) -> bytes:
        data = self.read(n)
        if len(data) < n:
            raise fail("TRUNCATED", f"file ends inside {what} (at byte {self.pos})")
        return data


def read_header_and_manifest(read: Callable[[int], bytes], max_manifest_length: int = L.MAX_MANIFEST_LENGTH,
                             ) -> tuple[Header, Manifest, bytes]:
    """Spec §10.1 steps 1-2 (without mode parameters). ``max_manifest_length``: this reader's own
    limit (spec §12 allows a lower one), checked before the manifest is read."""
    head = read(HEADER_SIZE)
    header = parse_header(head)
    if header.manifest_length > max_manifest_length:
        raise fail("LIMIT_EXCEEDED", f"Manifest_Length {header.manifest_length} is over this reader's limit "
                                     f"of {max_manifest_length} bytes")
    manifest_bytes = read(header.manifest_length)
    if len(manifest_bytes) < header.manifest_length:
        raise fail("TRUNCATED", "file ends inside the manifest")
    if crc32(manifest_bytes) != header.manifest_crc:
        raise fail("CHECKSUM_MISMATCH", "manifest CRC32 does not match")
    return header, parse_manifest(manifest_bytes), manifest_bytes


def iter_chunks_front_to_back(fileobj: BinaryIO, layout: StreamLayout,
                              on_manifest: Optional[Callable[[Header, Manifest], None]] = None,
                              max_manifest_length: int = L.MAX_MANIFEST_LENGTH,
                              ) -> Iterator[TensorChunks]:
    """Spec §10.1: read a whole file front to back, yielding each tensor once complete.

    Works on non-seekable streams. Holds one tensor's chunks in memory at a time.
    Every check of §10.1 is made, ending with the footer and end of file.
    """
    src = _Stream(fileobj)

    def read_start(n: int) -> bytes:
        return src.read(n)

    header, manifest, _ = read_header_and_manifest(read_start, max_manifest_length)
    layouts = _layouts(manifest, layout)
    if on_manifest is not None:
        on_manifest(header, manifest)
    order = _ChunkOrder(layouts)
    spans: list[tuple[int, int]] = [(0, 0)] * len(manifest.tensors)
    span_start: Optional[int] = None
    current: Optional[TensorChunks] = None
    next_to_yield = 0

    def flush_empty(upto: int) -> Iterator[TensorChunks]:
        nonlocal next_to_yield
        while next_to_yield < upto:
            i = next_to_yield
            yield TensorChunks(i, manifest.tensors[i], [[] for _ in layouts[i]])
            next_to_yield += 1

    while True:
        pos = src.pos
        tag = src.read(4)
        if len(tag) < 4:
            raise fail("TRUNCATED", f"file ends after the last chunk (at byte {src.pos}), before the index")
        if tag == INDEX_TAG:
            break
        if tag != CHUNK_TAG:
            raise fail("BAD_CHUNK", f"expected a chunk or the index at byte {pos}, found {tag!r}")
        h = parse_chunk_header(tag + src.read_exact(CHUNK_HEADER_SIZE - 4, "a chunk header"))
        if h.ancillary:
            if current is not None:  # spec §6.2: never inside a tensor's group of DATA chunks
                raise fail("BAD_CHUNK", f"ancillary chunk at byte {pos} inside the chunks of tensor "
                                        f"{current.index} ({current.record.name!r})")
            payload = src.read_exact(h.payload_length, "a chunk payload")
            check_payload(h, payload)
            continue
        expected_tensor = order.tensor
        completes = order.accept(h)
        yield from flush_empty(expected_tensor)
        if current is None:
            current = TensorChunks(expected_tensor, manifest.tensors[expected_tensor],
                                   [[] for _ in layouts[expected_tensor]])
            span_start = pos
        payload = src.read_exact(h.payload_length, "a chunk payload")
        check_payload(h, payload)
        current.streams[h.stream].append((h.item_count, payload))
        if completes:
            spans[current.index] = (span_start, src.pos - span_start)
            yield current
            next_to_yield = current.index + 1
            current = None
    index_offset = src.pos - 4
    if not order.done:
        raise fail("BAD_CHUNK", f"index starts before tensor {order.tensor} "
                                f"({manifest.tensors[order.tensor].name!r}) is complete")
    # spec §10.1 step 4-6
    entries = src.read_exact(INDEX_ENTRY_SIZE * len(manifest.tensors), "the index")
    footer = parse_footer(src.read_exact(FOOTER_SIZE, "the footer"))
    got = parse_index(INDEX_TAG + entries, len(manifest.tensors), footer.index_crc)
    _check_footer(footer, header, manifest, index_offset)
    if got != spans:
        bad = next(i for i, (a, b) in enumerate(zip(got, spans)) if a != b)
        raise fail("BAD_INDEX", f"index entry {bad} {got[bad]} does not match the chunks {spans[bad]}")
    if src.read(1):
        raise fail("TRAILING_DATA", "bytes after the footer")
    yield from flush_empty(len(manifest.tensors))


def _check_footer(footer: Footer, header: Header, manifest: Manifest, index_offset: int) -> None:
    if footer.tensor_count != len(manifest.tensors):
        raise fail("BAD_INDEX", f"footer Tensor_Count {footer.tensor_count} != {len(manifest.tensors)} tensors")
    if footer.manifest_length != header.manifest_length:
        raise fail("BAD_INDEX", "footer Manifest_Length does not match the header")
    if footer.index_offset != index_offset:
        raise fail("BAD_INDEX", f"footer Index_Offset {footer.index_offset} != {index_offset}")


# --- spec §10.2 random access -------------------------------------------------------------------

class RandomAccessReader:
    """Spec §10.2: footer, index, header and manifest, then one span per tensor.

    ``read_at(offset, length)`` returns up to ``length`` bytes; ``size`` is the file's length.
    """

    def __init__(self, read_at: Callable[[int, int], bytes], size: int, layout: StreamLayout,
                 max_manifest_length: int = L.MAX_MANIFEST_LENGTH):
        self._read_at = read_at
        self.size = size
        if size < HEADER_SIZE + FOOTER_SIZE:
            parse_header(read_at(0, HEADER_SIZE))
            raise fail("TRUNCATED", f"file of {size} bytes is too short for a .tqz file")
        footer_bytes = read_at(size - FOOTER_SIZE, FOOTER_SIZE)
        footer = parse_footer(footer_bytes)
        index_len = footer.index_length
        if footer.tensor_count > L.MAX_TENSORS:
            raise fail("LIMIT_EXCEEDED", f"footer declares {footer.tensor_count} tensors")
        if footer.index_offset + index_len + FOOTER_SIZE != size:
            raise fail("BAD_INDEX", "footer Index_Offset and Tensor_Count do not match the file length")
        index = read_at(footer.index_offset, index_len)
        if len(index) != index_len:
            raise fail("TRUNCATED", "file ends inside the index")
        self.spans = parse_index(index, footer.tensor_count, footer.index_crc)
        if footer.manifest_length > L.MAX_MANIFEST_LENGTH or HEADER_SIZE + footer.manifest_length > size:
            raise fail("BAD_INDEX", "footer Manifest_Length does not fit the file")
        if footer.manifest_length > max_manifest_length:
            raise fail("LIMIT_EXCEEDED", f"Manifest_Length {footer.manifest_length} is over this reader's "
                                         f"limit of {max_manifest_length} bytes")
        start = read_at(0, HEADER_SIZE + footer.manifest_length)
        pos = [0]

        def read_start(n: int) -> bytes:
            b = start[pos[0]:pos[0] + n]
            pos[0] += n
            return b

        self.header, self.manifest, _ = read_header_and_manifest(read_start, max_manifest_length)
        self.layouts = _layouts(self.manifest, layout)
        data_start = HEADER_SIZE + self.header.manifest_length
        _check_footer(footer, self.header, self.manifest, footer.index_offset)
        last_end = data_start
        for i, (off, length) in enumerate(self.spans):
            has_items = any(self.layouts[i])
            if (length == 0) != (not has_items) or (length == 0 and off != 0):
                raise fail("BAD_INDEX", f"index entry {i} does not match tensor {self.manifest.tensors[i].name!r}")
            if length:
                if off < last_end or off + length > footer.index_offset:
                    raise fail("BAD_INDEX", f"index entry {i} overlaps or lies outside the chunk area")
                last_end = off + length

    def tensor_chunks(self, index: int) -> TensorChunks:
        """Read tensor ``index``'s span and check it holds exactly its chunks (spec §9.1)."""
        record = self.manifest.tensors[index]
        layout = self.layouts[index]
        off, length = self.spans[index]
        streams: list[list[tuple[int, bytes]]] = [[] for _ in layout]
        if length == 0:
            return TensorChunks(index, record, streams)
        data = self._read_at(off, length)
        if len(data) != length:
            raise fail("TRUNCATED", f"file ends inside the span of tensor {record.name!r}")
        order = _ChunkOrder([(0,) * len(layout) if j != index else layout for j in range(index + 1)])
        pos = 0
        while pos < length:
            if length - pos < CHUNK_HEADER_SIZE:
                raise fail("BAD_INDEX", f"span of tensor {record.name!r} ends inside a chunk header")
            h = parse_chunk_header(data[pos:pos + CHUNK_HEADER_SIZE])
            if h.ancillary:
                raise fail("BAD_INDEX", f"span of tensor {record.name!r} holds an ancillary chunk")
            if pos + CHUNK_HEADER_SIZE + h.payload_length > length:
                raise fail("BAD_INDEX", f"span of tensor {record.name!r} ends inside a chunk")
            try:
                order.accept(h)
            except Exception as exc:
                code = getattr(exc, "code", None)
                if code == "BAD_CHUNK":
                    raise fail("BAD_INDEX", f"span of tensor {record.name!r}: {exc.message}") from None
                raise
            payload = data[pos + CHUNK_HEADER_SIZE:pos + CHUNK_HEADER_SIZE + h.payload_length]
            check_payload(h, payload)
            streams[h.stream].append((h.item_count, payload))
            pos += CHUNK_HEADER_SIZE + h.payload_length
        if not order.done:
            raise fail("BAD_INDEX", f"span of tensor {record.name!r} does not hold all its chunks")
        return TensorChunks(index, record, streams)


# --- writing ---------------------------------------------------------------------------------------

class ContainerWriter:
    """Writes a .tqz file: tensors' chunks are spooled, then header, manifest, chunks, index, footer.

    The manifest comes first in the file but is known only when every tensor is encoded,
    so chunk bytes wait in a spooled temporary file (memory up to 64 MiB, then disk).
    """

    def __init__(self, out: BinaryIO):
        self._out = out
        self._spool = tempfile.SpooledTemporaryFile(max_size=64 << 20)
        self._records: list[TensorRecord] = []
        self._spans: list[tuple[int, int]] = []

    def close(self) -> None:
        """Drop the spooled chunks (``finish`` does this; an encoder that fails midway may too)."""
        self._spool.close()

    def __enter__(self) -> "ContainerWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # an encoder that raised: no ResourceWarning, no spool file left
        spool = getattr(self, "_spool", None)
        if spool is not None:
            spool.close()

    def add_tensor(self, record: TensorRecord, streams: Sequence[Sequence[tuple[int, bytes]]]) -> int:
        """Append a tensor; ``streams[s]`` is its chunks as (Item_Count, payload). Returns its index."""
        index = len(self._records)
        start = self._spool.tell()
        for s, chunks in enumerate(streams):
            for seq, (count, payload) in enumerate(chunks):
                self._spool.write(pack_chunk(index, s, seq, count, payload))
        length = self._spool.tell() - start
        self._records.append(record)
        self._spans.append((start, length))
        return index

    def finish(self, metadata: dict) -> int:
        """Write everything to ``out``; returns the number of bytes written."""
        manifest = Manifest(metadata, tuple(self._records)).to_bytes()
        if len(manifest) > L.MAX_MANIFEST_LENGTH:
            raise fail("LIMIT_EXCEEDED", f"manifest of {len(manifest)} bytes is over 64 MiB")
        if len(self._records) > L.MAX_TENSORS:
            raise fail("LIMIT_EXCEEDED", f"{len(self._records)} tensors (limit {L.MAX_TENSORS})")
        data_start = HEADER_SIZE + len(manifest)
        minor = max((MODE_SINCE_MINOR.get(r.mode, 0) for r in self._records), default=0)
        self._out.write(pack_header(manifest, minor))
        self._out.write(manifest)
        self._spool.seek(0)
        shutil.copyfileobj(self._spool, self._out, 1 << 20)
        index_offset = data_start + self._spool.tell()
        spans = [(data_start + s, n) if n else (0, 0) for s, n in self._spans]
        index = pack_index(spans)
        self._out.write(index)
        self._out.write(pack_footer(index_offset, index, len(self._records), len(manifest)))
        self._spool.close()
        return index_offset + len(index) + FOOTER_SIZE


def bytes_reader(data: bytes) -> Callable[[int, int], bytes]:
    """``read_at`` over an in-memory file."""
    view = memoryview(data)
    return lambda off, n: bytes(view[off:off + n])


def file_reader(f: BinaryIO) -> Callable[[int, int], bytes]:
    """``read_at`` over a seekable binary file, safe to call from several threads at once.

    Positional reads (``os.pread``) share no file position between threads; where there is
    no ``pread`` (or no file descriptor), a lock keeps each seek and read together.
    """
    try:
        fd = f.fileno()
    except (AttributeError, OSError, ValueError):
        fd = None
    if fd is not None and hasattr(os, "pread"):
        def pread_at(off: int, n: int) -> bytes:
            parts = []
            while n > 0:
                b = os.pread(fd, min(n, 1 << 30), off)
                if not b:
                    break
                parts.append(b)
                off += len(b)
                n -= len(b)
            return b"".join(parts)
        return pread_at

    lock = threading.Lock()

    def read_at(off: int, n: int) -> bytes:
        with lock:
            f.seek(off)
            return f.read(n)
    return read_at


__all__ = ["ContainerWriter", "RandomAccessReader", "TensorChunks", "iter_chunks_front_to_back",
           "StreamLayout", "crc32"]
