"""One Zstandard frame with the checks of spec §7.2 (a ``raw`` payload) and §5.0 (a compressed
manifest): frame header, content size, window limit, then the blocks with the output bounded.

This module knows bytes only. Both callers share the order of checks; they differ in the error
code of a bad frame (``BAD_PAYLOAD`` or ``BAD_MANIFEST``) and in what the content size must be.
"""
from __future__ import annotations

from typing import Optional

import zstandard

from ..errors import fail

MAX_WINDOW = 1 << 27  # spec §12: zstd Window_Size


def decompress_frame(frame: bytes, *, what: str, bad: str, size: Optional[int] = None,
                     max_size: Optional[int] = None) -> bytes:
    """Decompress exactly one zstd frame, checked in spec §7.2's order.

    ``size``: the number of bytes the frame must give (a ``raw`` chunk's ``Item_Count``); a frame
    that declares its content size must declare this one. ``max_size``: instead of ``size``, the
    frame must declare its content size, between 1 and ``max_size`` (spec §5.0; over it is
    ``LIMIT_EXCEEDED``). ``bad`` is the error code of a frame that breaks a rule; ``what`` names
    the frame in messages.
    """
    try:
        params = zstandard.get_frame_parameters(frame)
    except zstandard.ZstdError as exc:
        raise fail(bad, f"{what}: not a zstd frame ({exc})") from None
    if params.dict_id != 0:  # step 1 (libzstd would also refuse it, but only after the window check)
        raise fail(bad, f"{what}: zstd frame needs dictionary {params.dict_id}")
    declared = params.content_size
    if size is None:  # step 2, compressed manifest
        if declared == zstandard.CONTENTSIZE_UNKNOWN or declared < 1:
            raise fail(bad, f"{what}: zstd frame does not declare a content size of at least 1 byte")
        if max_size is not None and declared > max_size:
            raise fail("LIMIT_EXCEEDED", f"{what}: zstd frame declares {declared} bytes, over this "
                                         f"reader's limit of {max_size} bytes")
        size = declared
    elif declared not in (zstandard.CONTENTSIZE_UNKNOWN, size):  # step 2, raw chunk
        raise fail(bad, f"{what}: zstd frame declares {declared} bytes, chunk declares {size}")
    if params.window_size > MAX_WINDOW:  # step 3 (also libzstd's default decoder limit)
        raise fail("LIMIT_EXCEEDED", f"{what}: zstd frame declares a {params.window_size}-byte "
                                     "window (the limit is 2^27)")
    try:  # step 4; the declared size was checked above, so max_output_size bounds every case
        out = zstandard.ZstdDecompressor().decompress(frame, max_output_size=size, allow_extra_data=False)
    except zstandard.ZstdError as exc:
        raise fail(bad, f"{what}: corrupt zstd frame ({exc})") from None
    if len(out) != size:
        raise fail(bad, f"{what}: zstd frame gives {len(out)} bytes, not {size}")
    return out


def compress_frame(data: bytes, level: int) -> bytes:
    """One zstd frame of ``data`` with its content size, no checksum and no dictionary, on this
    thread (so the same bytes and level give the same frame)."""
    cctx = zstandard.ZstdCompressor(level=level, write_content_size=True, write_checksum=False, threads=0)
    return cctx.compress(data)
