"""Damaged and hostile files: each gives a TqzError with the right code, never a traceback."""
from __future__ import annotations

import struct
import zlib

import pytest
import torch

import tqcodec
from tqcodec.format.chunks import CHUNK_HEADER_SIZE
from tqcodec.format.header import HEADER_SIZE
from tqcodec.format.index import FOOTER_SIZE
from tests.conftest import small_state_dict


@pytest.fixture(scope="module")
def good() -> bytes:
    return tqcodec.encode_bytes(small_state_dict())


def regions(data: bytes) -> dict[str, list[int]]:
    """Byte offsets of each region of a file, found from its own structures."""
    mlen = struct.unpack_from("<I", data, 20)[0]
    index_offset = struct.unpack_from("<Q", data, len(data) - FOOTER_SIZE)[0]
    chunk_headers, payloads = [], []
    pos = HEADER_SIZE + mlen
    while pos < index_offset:
        plen = struct.unpack_from("<I", data, pos + 20)[0]
        chunk_headers.append(pos)
        payloads.append(pos + CHUNK_HEADER_SIZE)
        pos += CHUNK_HEADER_SIZE + plen
    return {"header": [HEADER_SIZE], "manifest": [HEADER_SIZE + mlen], "chunk_headers": chunk_headers,
            "payloads": payloads, "index": [index_offset], "footer": [len(data) - FOOTER_SIZE],
            "mlen": [mlen], "index_offset": [index_offset]}


def decode_both(data: bytes) -> set[str]:
    """Codes given by front-to-back load and by random access (empty set = decoded)."""
    codes = set()
    for how in ("load", "open"):
        try:
            if how == "load":
                tqcodec.load(data)
            else:
                with tqcodec.open(data) as f:
                    for k in f.keys():
                        f.get_tensor(k)
        except tqcodec.TqzError as exc:
            codes.add(exc.code)
    return codes


def test_truncated_at_every_chunk_boundary(good):
    r = regions(good)
    cuts = {0, 1, 7, 8, 31, 32, r["header"][0] + r["mlen"][0] - 1, r["index_offset"][0],
            r["index_offset"][0] + 4, len(good) - FOOTER_SIZE, len(good) - 1}
    for h in r["chunk_headers"]:
        cuts |= {h, h + 4, h + CHUNK_HEADER_SIZE - 1, h + CHUNK_HEADER_SIZE, h + CHUNK_HEADER_SIZE + 1}
    for cut in sorted(cuts):
        assert decode_both(good[:cut]) == {"TRUNCATED"}, cut


def test_truncated_everywhere_never_decodes(good):
    for cut in range(0, len(good), max(1, len(good) // 300)):
        codes = decode_both(good[:cut])
        assert codes and codes <= {"TRUNCATED", "BAD_MAGIC"}, (cut, codes)


@pytest.mark.parametrize("region", ["header", "manifest", "chunk_headers", "payloads", "index", "footer"])
def test_flipped_byte_in_each_region_is_detected(good, region):
    r = regions(good)
    starts = {"header": [0, 12, 20, 28], "manifest": [HEADER_SIZE, HEADER_SIZE + r["mlen"][0] // 2],
              "chunk_headers": [h + k for h in r["chunk_headers"][:3] for k in (0, 5, 9, 17, 21, 25, 29)],
              "payloads": [p + 1 for p in r["payloads"][:5]],
              "index": [r["index_offset"][0] + k for k in (0, 5, 12)],
              "footer": [len(good) - FOOTER_SIZE + k for k in (0, 9, 13, 17, 21, 27)]}[region]
    for pos in starts:
        bad = bytearray(good)
        bad[pos] ^= 0x5A
        codes = decode_both(bytes(bad))
        assert codes, f"flip at {pos} in {region} decoded silently"
        assert "CHECKSUM_MISMATCH" in codes or codes & {"BAD_MAGIC", "BAD_CHUNK", "UNSUPPORTED_VERSION",
                                                        "BAD_INDEX", "LIMIT_EXCEEDED", "TRUNCATED"}, codes


def test_every_single_bit_flip_in_a_small_file_is_rejected():
    data = tqcodec.encode_bytes({"w": torch.randn(6, 40, generator=torch.Generator().manual_seed(0)),
                                 "b": torch.arange(4.0)})
    for pos in range(len(data)):
        bad = bytearray(data)
        bad[pos] ^= 1 << (pos % 8)
        assert decode_both(bytes(bad)), f"bit flip at byte {pos} decoded silently"


def test_html_page_is_bad_magic(tmp_path):
    page = tmp_path / "model.tqz"
    page.write_bytes(b"<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head><body>nope</body></html>\n")
    for call in (tqcodec.load, tqcodec.open):
        with pytest.raises(tqcodec.TqzError) as e:
            call(page)
        assert e.value.code == "BAD_MAGIC"
        assert str(page) in str(e.value) and "HTML" in str(e.value)


def test_empty_file_and_missing_file(tmp_path):
    empty = tmp_path / "e.tqz"
    empty.write_bytes(b"")
    with pytest.raises(tqcodec.TqzError) as e:
        tqcodec.load(empty)
    assert e.value.code == "TRUNCATED"
    with pytest.raises(tqcodec.TqzError) as e:
        tqcodec.load(tmp_path / "missing.tqz")
    assert e.value.code == "IO_ERROR"


def fix_header_crc(b: bytearray) -> None:
    struct.pack_into("<I", b, 28, zlib.crc32(bytes(b[:28])))


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


def test_bytes_after_footer(good):
    assert "TRAILING_DATA" in decode_both(good + b"\x00")
    assert decode_both(good + b"junk" * 10) == {"TRAILING_DATA"}


def test_huge_manifest_length_is_a_limit_not_an_allocation(good):
    bad = bytearray(good)
    struct.pack_into("<I", bad, 20, 0xFFFFFFFF)
    fix_header_crc(bad)
    assert "LIMIT_EXCEEDED" in decode_both(bytes(bad))
