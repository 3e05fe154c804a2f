"""Spec §10: reading a file, front to back (§10.1, any stream) or by random access (§10.2).

This module knows bytes, not numerics: a mode is visible to it only through ``StreamLayout``,
the item count and payload kind of each of a tensor's streams (``StreamSpec``).
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import BinaryIO, Callable, Iterator, Optional, Sequence

from .. import limits as L
from ..errors import TqzError, fail
from .checksum import crc32
from .chunks import (CHUNK_HEADER_SIZE, CHUNK_TAG, ChunkOrder, StreamSpec, check_payload, check_payload_length,
                     parse_chunk_header)
from .header import HEADER_SIZE, Header, parse_header
from .index import FOOTER_SIZE, INDEX_ENTRY_SIZE, INDEX_TAG, check_footer, parse_footer, parse_index
from .manifest import Manifest, TensorRecord, parse_manifest, unstore_manifest

StreamLayout = Callable[[int, TensorRecord, Sequence[TensorRecord]], tuple[StreamSpec, ...]]
"""(tensor index, record, all records) -> each stream's item count and payload kind; validates the
mode's params."""


@dataclass
class TensorChunks:
    """A tensor's DATA chunks, grouped by stream (payloads CRC-checked)."""

    index: int
    record: TensorRecord
    streams: list[list[tuple[int, bytes]]]  # per stream: (Item_Count, payload)


def _layouts(manifest: Manifest, layout: StreamLayout) -> list[tuple[StreamSpec, ...]]:
    """Each tensor's streams (spec §10.1 step 2: the mode's parameters). A mode reports hostile
    parameters as a TqzError; any other exception is a bug and propagates."""
    return [tuple(layout(i, r, manifest.tensors)) for i, r in enumerate(manifest.tensors)]


def _items(specs: Sequence[StreamSpec]) -> tuple[int, ...]:
    return tuple(s.items for s in specs)


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
    plain = unstore_manifest(manifest_bytes, header.required_features, max_manifest_length)
    return header, parse_manifest(plain), manifest_bytes


def iter_chunks_front_to_back(fileobj: BinaryIO, layout: StreamLayout,
                              on_manifest: Optional[Callable[[Header, Manifest], None]] = None,
                              max_manifest_length: int = L.MAX_MANIFEST_LENGTH,
                              on_chunk: Optional[Callable[[int, int, int, bytes], None]] = None,
                              ) -> Iterator[TensorChunks]:
    """Spec §10.1: read a whole file front to back, yielding each tensor once complete.

    Works on non-seekable streams. Holds one tensor's chunks in memory at a time.
    Every check of §10.1 is made, ending with the footer and end of file. ``on_chunk(tensor
    index, stream, Item_Count, payload)`` is called for each DATA chunk once its header, place
    and CRC are checked (a parallel decoder starts on it before the tensor is complete).
    """
    src = _Stream(fileobj)

    def read_start(n: int) -> bytes:
        return src.read(n)

    header, manifest, _ = read_header_and_manifest(read_start, max_manifest_length)
    layouts = _layouts(manifest, layout)
    if on_manifest is not None:
        on_manifest(header, manifest)
    order = ChunkOrder([_items(specs) for specs in layouts])
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
        check_payload_length(h, layouts[expected_tensor][h.stream].kind)  # before the payload is read
        yield from flush_empty(expected_tensor)
        if current is None:
            current = TensorChunks(expected_tensor, manifest.tensors[expected_tensor],
                                   [[] for _ in layouts[expected_tensor]])
            span_start = pos
        payload = src.read_exact(h.payload_length, "a chunk payload")
        check_payload(h, payload)
        current.streams[h.stream].append((h.item_count, payload))
        if on_chunk is not None:
            on_chunk(current.index, h.stream, h.item_count, payload)
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
    check_footer(footer, header, manifest, index_offset)
    if got != spans:
        bad = next(i for i, (a, b) in enumerate(zip(got, spans)) if a != b)
        raise fail("BAD_INDEX", f"index entry {bad} {got[bad]} does not match the chunks {spans[bad]}")
    if src.read(1):
        raise fail("TRAILING_DATA", "bytes after the footer")
    yield from flush_empty(len(manifest.tensors))


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
        check_footer(footer, self.header, self.manifest, footer.index_offset)
        last_end = data_start
        for i, (off, length) in enumerate(self.spans):
            has_items = any(_items(self.layouts[i]))
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
        counts = _items(layout)
        order = ChunkOrder([(0,) * len(layout) if j != index else counts for j in range(index + 1)])
        pos = 0
        while pos < length:
            if length - pos < CHUNK_HEADER_SIZE:
                raise fail("BAD_INDEX", f"span of tensor {record.name!r} ends inside a chunk header")
            h = parse_chunk_header(data[pos:pos + CHUNK_HEADER_SIZE])
            if h.ancillary:
                raise fail("BAD_INDEX", f"span of tensor {record.name!r} holds an ancillary chunk")
            try:
                order.accept(h)
            except TqzError as exc:
                if exc.code == "BAD_CHUNK":  # spec §10.2: a span that does not hold its chunks
                    raise fail("BAD_INDEX", f"span of tensor {record.name!r}: {exc.message}") from None
                raise
            # spec §10.1 step 3's order: the mode's length rule (the chunk's own defect, BAD_CHUNK as
            # front to back) before the payload's end is compared with the span's
            check_payload_length(h, layout[h.stream].kind)
            if pos + CHUNK_HEADER_SIZE + h.payload_length > length:
                raise fail("BAD_INDEX", f"span of tensor {record.name!r} ends inside a chunk")
            payload = data[pos + CHUNK_HEADER_SIZE:pos + CHUNK_HEADER_SIZE + h.payload_length]
            check_payload(h, payload)
            streams[h.stream].append((h.item_count, payload))
            pos += CHUNK_HEADER_SIZE + h.payload_length
        if not order.done:
            raise fail("BAD_INDEX", f"span of tensor {record.name!r} does not hold all its chunks")
        return TensorChunks(index, record, streams)


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
