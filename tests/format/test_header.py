"""tqcodec.format.header (spec §3 and the version rules of §13): the magic, major and minor
versions, required and optional feature bits, and the lowest minor version a written file declares."""
from __future__ import annotations

import struct

import pytest
import torch

import tqcodec
from tests.helpers import decode_both, fix_header_crc


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
    # spec §13: tq arrived in 1.1, so only files holding a tq tensor say 1.1
    g = torch.Generator().manual_seed(3)
    sd = {"w": torch.randn(32, 64, generator=g), "b": torch.randn(32, generator=g)}
    with_tq = tqcodec.encode_bytes(sd, mode="tq", bits=4)
    without = tqcodec.encode_bytes(sd, mode="uniform")
    assert with_tq[8:12] == bytes([1, 0, 1, 0])
    assert without[8:12] == bytes([1, 0, 0, 0])
    with tqcodec.open(with_tq) as f:
        assert f.version == (1, 1) and f.info("w").mode == "tq"
