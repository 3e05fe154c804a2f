"""Spec §3: the 32-byte file header, and the version rules of spec §13."""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Iterable

from .. import limits as L
from ..errors import fail
from .checksum import crc32

MAGIC = b"\x89TQZ\r\n\x1a\n"
HEADER_SIZE = 32
MAJOR_VERSION = 1
MINOR_VERSION = 4  # the newest minor version this reader and writer implement
# Spec §13: a writer puts the lowest minor version that defines everything a file uses. Modes not
# listed here are from 1.0.
MODE_SINCE_MINOR = {"tq": 1, "ecsq": 2, "kmeans": 2, "pq": 2, "dither": 2}
# Spec §4: required feature bits, and the minor version that defined each.
ZSTD_MANIFEST = 1 << 0  # the manifest is stored as one zstd frame (§5.0), since 1.3
FEATURE_SINCE_MINOR = {ZSTD_MANIFEST: 3}
KNOWN_REQUIRED_FEATURES = ZSTD_MANIFEST
# Spec §13: optional parameters of a mode that a later minor version added ((mode, key) -> minor).
PARAM_SINCE_MINOR = {("tq", "row_band"): 4}

_HEADER = struct.Struct("<8sHHIIIII")


def minor_version_for(modes: Iterable[str], required_features: int = 0,
                      params: Iterable[tuple[str, str]] = ()) -> int:
    """Spec §13: the lowest minor version that defines every mode in ``modes``, every bit of
    ``required_features`` and every (mode, parameter key) of ``params``."""
    features = (v for bit, v in FEATURE_SINCE_MINOR.items() if required_features & bit)
    keys = (PARAM_SINCE_MINOR.get(mk, 0) for mk in params)
    return max((*(MODE_SINCE_MINOR.get(m, 0) for m in modes), *features, *keys), default=0)


@dataclass(frozen=True)
class Header:
    major: int
    minor: int
    required_features: int
    optional_features: int
    manifest_length: int
    manifest_crc: int


def pack_header(stored_manifest: bytes, minor: int = MINOR_VERSION, required_features: int = 0) -> bytes:
    """Spec §3: the 32-byte header for ``stored_manifest`` (the manifest's bytes as the file holds
    them, §5.0)."""
    body = _HEADER.pack(MAGIC, MAJOR_VERSION, minor, required_features, 0, len(stored_manifest),
                        crc32(stored_manifest), 0)[:28]
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

