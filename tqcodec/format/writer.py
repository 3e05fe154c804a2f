"""Writing a .tqz file (spec §3-§9 in file order: header, manifest, chunks, index, footer)."""
from __future__ import annotations

import shutil
import tempfile
from typing import BinaryIO, Sequence

from .. import limits as L
from ..errors import fail
from .chunks import pack_chunk
from .header import HEADER_SIZE, minor_version_for, pack_header
from .index import FOOTER_SIZE, pack_footer, pack_index
from .manifest import Manifest, TensorRecord, store_manifest


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
        plain = Manifest(metadata, tuple(self._records)).to_bytes()
        if len(plain) > L.MAX_MANIFEST_LENGTH:
            raise fail("LIMIT_EXCEEDED", f"manifest of {len(plain)} bytes is over 64 MiB")
        if len(self._records) > L.MAX_TENSORS:
            raise fail("LIMIT_EXCEEDED", f"{len(self._records)} tensors (limit {L.MAX_TENSORS})")
        manifest, required = store_manifest(plain)
        data_start = HEADER_SIZE + len(manifest)
        minor = minor_version_for((r.mode for r in self._records), required,
                                  ((r.mode, key) for r in self._records for key in r.params))
        self._out.write(pack_header(manifest, minor, required))
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

