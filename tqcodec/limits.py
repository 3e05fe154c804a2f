"""Limits on every count and size read from a file (spec §12), plus resource limits.

The format limits are fixed by the spec. The resource limits are this decoder's own (spec §12
allows lower ones, down to the floor of §12.1's conformance levels) and can be changed per call:
``tqcodec.open(path, limits=...)``.

Conformance levels (spec §12.1), from four measures of a file: ``B1`` the largest tensor's bytes,
``BT`` all tensors' bytes (aliases included), ``W`` the tq transform work (sum of n·m·k), ``L`` the
file length. Level 1 (every decoder): 2^30, 2^32, 2^36, 2^32. Level 2: 2^36, 2^42, 2^46, 2^44.
With its default limits tqcodec is a Level 2 decoder: ``max_tensor_bytes`` is Level 2's ``B1``, and
``BT``, ``W`` and ``L`` have no limit of their own (tensors are handed out one at a time; memory
runs out before, and is reported as ``LIMIT_EXCEEDED``). A ``max_tensor_bytes`` below Level 1's
2^30 makes the reader refuse some valid files every conforming decoder must decode: fine for
untrusted input, but not conforming for those files.
"""
from __future__ import annotations

from dataclasses import dataclass

# spec §12.1 conformance levels: the largest tensor's bytes (B1) a decoder of the level must decode
LEVEL1_TENSOR_BYTES = 1 << 30
LEVEL2_TENSOR_BYTES = 1 << 36

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

    ``max_tensor_bytes``: the decoded size of one tensor; the default is spec §12.1's Level 2
    (2^36 bytes), below ``LEVEL1_TENSOR_BYTES`` (2^30) the reader is below Level 1.
    ``max_manifest_bytes``: the manifest's length (at most the format's 64 MiB).
    """

    max_tensor_bytes: int = LEVEL2_TENSOR_BYTES
    max_manifest_bytes: int = MAX_MANIFEST_LENGTH


DEFAULT_LIMITS = Limits()
