"""tqcodec.format.reader, both readers (front to back through ``load``, random access through
``open``): damaged and truncated files each give a TqzError with the right code, never a traceback,
and this reader's resource limits (spec §12) are enforced on the manifest."""
from __future__ import annotations

import struct

import pytest
import torch

import tqcodec
from tqcodec.errors import TqzError
from tqcodec.format.chunks import CHUNK_HEADER_SIZE
from tqcodec.format import header
from tqcodec.format.header import HEADER_SIZE
from tqcodec.format.manifest import unstore_manifest
from tqcodec.format.index import FOOTER_SIZE
from tqcodec.limits import Limits
from tests.fuzzing import decode_load, decode_open
from tests.helpers import decode_both, fix_header_crc, regions


def test_truncated_files_never_decode(good):
    """Cut at every chunk boundary (and at the edges of the header, manifest, index and footer) a
    file is TRUNCATED both ways; cut anywhere else it is TRUNCATED or BAD_MAGIC, never decoded."""
    r = regions(good)
    cuts = {0, 1, 7, 8, 31, 32, r["header"][0] + r["mlen"][0] - 1, r["index_offset"][0],
            r["index_offset"][0] + 4, len(good) - FOOTER_SIZE, len(good) - 1}
    for h in r["chunk_headers"]:
        cuts |= {h, h + 4, h + CHUNK_HEADER_SIZE - 1, h + CHUNK_HEADER_SIZE, h + CHUNK_HEADER_SIZE + 1}
    for cut in sorted(cuts):
        assert decode_both(good[:cut]) == {"TRUNCATED"}, cut
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


def test_empty_file_and_missing_file(tmp_path):
    empty = tmp_path / "e.tqz"
    empty.write_bytes(b"")
    with pytest.raises(tqcodec.TqzError) as e:
        tqcodec.load(empty)
    assert e.value.code == "TRUNCATED"
    with pytest.raises(tqcodec.TqzError) as e:
        tqcodec.load(tmp_path / "missing.tqz")
    assert e.value.code == "IO_ERROR"


def test_bytes_after_footer(good):
    assert "TRAILING_DATA" in decode_both(good + b"\x00")
    assert decode_both(good + b"junk" * 10) == {"TRAILING_DATA"}


def test_manifest_over_this_readers_limit(good):
    """A Manifest_Length over this reader's limit is LIMIT_EXCEEDED, not an allocation: a huge
    declared length (CRC fixed), and a real manifest one byte over a lowered limit; at the limit the
    file decodes, the same both ways. The limit is on the manifest, so on a compressed one (§5.0)
    it applies to the frame's content size."""
    bad = bytearray(good)
    struct.pack_into("<I", bad, 20, 0xFFFFFFFF)
    fix_header_crc(bad)
    assert "LIMIT_EXCEEDED" in decode_both(bytes(bad))
    stored = good[32:32 + struct.unpack_from("<I", good, 20)[0]]
    assert struct.unpack_from("<I", good, 12)[0] == header.ZSTD_MANIFEST  # the case §5.0 adds
    mlen = len(unstore_manifest(stored, header.ZSTD_MANIFEST))
    assert mlen > len(stored)
    for fn in (tqcodec.load, tqcodec.open):
        with pytest.raises(TqzError) as e:
            fn(good, limits=Limits(max_manifest_bytes=mlen - 1))
        assert e.value.code == "LIMIT_EXCEEDED" and "this reader's limit" in e.value.message
    assert decode_load(good, Limits(max_manifest_bytes=mlen)) == decode_open(good, Limits(max_manifest_bytes=mlen))
