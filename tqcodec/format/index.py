"""Spec §9: the index of tensor spans and the footer."""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Sequence

from ..errors import fail
from .checksum import crc32
from .header import Header
from .manifest import Manifest

INDEX_TAG = b"TQIX"
FOOTER_MAGIC = b"\x89TQZEND\n"
FOOTER_SIZE = 32
INDEX_ENTRY_SIZE = 16

_FOOTER = struct.Struct("<QIIII8s")
_SPAN = struct.Struct("<QQ")


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


def check_footer(footer: Footer, header: Header, manifest: Manifest, index_offset: int) -> None:
    if footer.tensor_count != len(manifest.tensors):
        raise fail("BAD_INDEX", f"footer Tensor_Count {footer.tensor_count} != {len(manifest.tensors)} tensors")
    if footer.manifest_length != header.manifest_length:
        raise fail("BAD_INDEX", "footer Manifest_Length does not match the header")
    if footer.index_offset != index_offset:
        raise fail("BAD_INDEX", f"footer Index_Offset {footer.index_offset} != {index_offset}")

