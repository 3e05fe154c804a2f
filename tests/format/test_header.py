"""tqcodec.format.header (spec §3 and the version rules of §13): the magic, major and minor
versions, required and optional feature bits, and the lowest minor version a written file declares."""
from __future__ import annotations

import struct

import pytest
import torch

import tqcodec
from tests.fuzzing import assemble, split, tensor_count
from tests.helpers import decode_both, fix_header_crc
from tqcodec.format import header
from tqcodec.format.manifest import unstore_manifest


def test_html_page_is_bad_magic(tmp_path):
    page = tmp_path / "model.tqz"
    page.write_bytes(b"<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head><body>nope</body></html>\n")
    for call in (tqcodec.load, tqcodec.open):
        with pytest.raises(tqcodec.TqzError) as e:
            call(page)
        assert e.value.code == "BAD_MAGIC"
        assert str(page) in str(e.value) and "HTML" in str(e.value)


def test_future_major_version_and_unknown_required_feature(good):
    bad = bytearray(good)
    struct.pack_into("<H", bad, 8, 2)
    fix_header_crc(bad)
    assert decode_both(bytes(bad)) == {"UNSUPPORTED_VERSION"}
    bad = bytearray(good)
    struct.pack_into("<I", bad, 12, 1 << 5)
    fix_header_crc(bad)
    assert decode_both(bytes(bad)) == {"UNKNOWN_REQUIRED_FEATURE"}


def test_newer_minor_and_unknown_optional_features_are_read(good):
    bad = bytearray(good)
    struct.pack_into("<H", bad, 10, 7)
    struct.pack_into("<I", bad, 16, 0xFFFFFFFF)
    fix_header_crc(bad)
    assert decode_both(bytes(bad)) == set()


def test_header_names_the_lowest_minor_version_a_file_needs():
    # spec §13: tq arrived in 1.1 and the compressed manifest (§5.0, required feature bit 0) in 1.3;
    # a file says 1.3 only when its manifest is stored compressed, which the writer does only
    # where the frame is shorter than the manifest
    g = torch.Generator().manual_seed(3)
    tiny_tq = tqcodec.encode_bytes({"w": torch.randn(8, 8, generator=g)}, mode="tq", bits=4)
    tiny_raw = tqcodec.encode_bytes({"w": torch.randn(8, 8, generator=g)}, lossless=True)
    sd = {f"layer{i}.weight": torch.randn(32, 64, generator=g) for i in range(4)}
    compressed = tqcodec.encode_bytes(sd, mode="tq", bits=4)
    assert tiny_tq[8:16] == bytes([1, 0, 1, 0, 0, 0, 0, 0])
    assert tiny_raw[8:16] == bytes([1, 0, 0, 0, 0, 0, 0, 0])
    assert compressed[8:16] == bytes([1, 0, 3, 0, header.ZSTD_MANIFEST, 0, 0, 0])
    mlen = struct.unpack_from("<I", compressed, 20)[0]
    plain = unstore_manifest(compressed[32:32 + mlen], header.ZSTD_MANIFEST)
    assert len(plain) > 1.5 * mlen  # four records with the same keys
    for data, version in ((tiny_tq, (1, 1)), (compressed, (1, 3))):
        with tqcodec.open(data) as f:
            assert f.version == version and f.info(f.keys()[0]).mode == "tq"


def test_compressed_manifest_frame_is_checked(good):
    """Spec §5.0: with ZSTD_MANIFEST set, the stored manifest must be one zstd frame that declares
    its content size; a plain manifest under the bit, a frame without a content size, one with a
    byte after it, and bit 0 cleared over a compressed manifest are each rejected, with one code,
    the same by both readers."""
    import zstandard
    mlen = struct.unpack_from("<I", good, 20)[0]
    stored = good[32:32 + mlen]
    plain = unstore_manifest(stored, header.ZSTD_MANIFEST)

    parts = split(good)
    assert parts is not None and parts[0] == plain

    def with_manifest(manifest: bytes, required: int) -> bytes:
        out = bytearray(assemble(manifest, parts[1], tensor_count(plain)))
        struct.pack_into("<I", out, 12, required)
        fix_header_crc(out)
        return bytes(out)

    assert decode_both(with_manifest(plain, 0)) == set()  # the same manifest, stored plain, is valid
    assert decode_both(with_manifest(plain, header.ZSTD_MANIFEST)) == {"BAD_MANIFEST"}
    assert decode_both(with_manifest(stored, 0)) == {"BAD_MANIFEST"}
    no_size = zstandard.ZstdCompressor(write_content_size=False).compress(plain)
    assert decode_both(with_manifest(no_size, header.ZSTD_MANIFEST)) == {"BAD_MANIFEST"}
    assert decode_both(with_manifest(stored + b"\0", header.ZSTD_MANIFEST)) == {"BAD_MANIFEST"}
    wrong_size = stored[:5] + bytes([stored[5] ^ 1]) + stored[6:]  # the content size field, one off
    assert zstandard.get_frame_parameters(wrong_size).content_size != len(plain)
    assert decode_both(with_manifest(wrong_size, header.ZSTD_MANIFEST)) == {"BAD_MANIFEST"}
