"""Limits on every count and size read from a file (spec §12), plus resource limits.

The format limits are fixed by the spec. The resource limits are this decoder's own
(spec §12 allows lower ones) and can be raised per call: ``tqcodec.open(path, limits=...)``.
"""
from __future__ import annotations

from dataclasses import dataclass

# spec §12 (format limits; a file over one is invalid everywhere)
MAX_MANIFEST_LENGTH = 1 << 26
MAX_TENSORS = 1 << 20
MAX_METADATA_ENTRIES = 4096
MAX_MSGPACK_DEPTH = 16
MAX_NAME_BYTES = 1024
MAX_NDIM = 8
MAX_DIM = 1 << 40
MAX_NUMEL = 1 << 36
MAX_CHUNK_ITEMS = 1 << 26
MAX_CHUNK_PAYLOAD = 1 << 28
MAX_ALPHABET = 65536
MAX_LEVEL = 1 << 20


@dataclass(frozen=True)
class Limits:
    """Resource limits of this decoder (spec §12 allows a decoder lower ones).

    ``max_tensor_bytes``: the decoded size of one tensor. ``max_manifest_bytes``: the
    manifest's length (at most the format's 64 MiB).
    """

    max_tensor_bytes: int = 1 << 36
    max_manifest_bytes: int = MAX_MANIFEST_LENGTH


DEFAULT_LIMITS = Limits()
