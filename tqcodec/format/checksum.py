"""Spec §1: the one checksum of the format, CRC-32/ISO-HDLC."""
from __future__ import annotations

import zlib


def crc32(data: bytes) -> int:
    """CRC-32/ISO-HDLC of ``data`` (zlib's CRC-32)."""
    return zlib.crc32(data) & 0xFFFFFFFF
