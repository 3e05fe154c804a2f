"""tqcodec.pipeline.decode: a record checked against this reader's resource limits (spec §12)
before anything is allocated, then decoded through its mode (decompression bombs, issue 8)."""
from __future__ import annotations

import io
import tracemalloc

import numpy as np
import pytest

import tqcodec
from tqcodec.coding.rangecoder import encode_symbols
from tqcodec.errors import TqzError
from tqcodec.format.leb128 import pack_freqs
from tqcodec.format.manifest import TensorRecord
from tqcodec.format.writer import ContainerWriter
from tqcodec.limits import Limits


def _constant_tensor_file(shape: tuple, dtype: str = "float32") -> bytes:
    """A ~200-byte valid file whose one tensor is constant (uniform, A = 1: no chunks at all)."""
    buf = io.BytesIO()
    w = ContainerWriter(buf)
    w.add_tensor(TensorRecord("bomb", dtype, shape, "uniform",
                              {"granularity": "tensor", "steps": [0], "q_min": 1,
                               "freqs": pack_freqs(np.array([1 << 24]))}), [])
    w.finish({})
    return buf.getvalue()


@pytest.mark.parametrize("shape", [(1 << 30,), (1 << 18, 1 << 17), (1 << 36,)])
def test_tiny_file_declaring_a_huge_tensor_is_refused_before_allocating(shape):
    data = _constant_tensor_file(shape)
    assert len(data) < 300
    limits = Limits(max_tensor_bytes=1 << 30)
    tracemalloc.start()
    try:
        for fn in (lambda: tqcodec.load(data, limits=limits), lambda: tqcodec.open(data, limits=limits)):
            with pytest.raises(TqzError) as e:
                fn()
            assert e.value.code == "LIMIT_EXCEEDED"
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20


def test_range_coded_chunk_expanding_to_its_item_limit_is_bounded():
    """36 bytes of chunk may legitimately hold 2^26 symbols; the decoder limit still caps a tensor."""
    freqs = np.array([(1 << 24) - 1, 1], dtype=np.uint32)
    n = 1 << 22
    words = encode_symbols(np.zeros(n, dtype=np.int32), freqs).astype("<u4").tobytes()
    assert len(words) <= 8
    buf = io.BytesIO()
    w = ContainerWriter(buf)
    w.add_tensor(TensorRecord("z", "float32", (n,), "uniform",
                              {"granularity": "tensor", "steps": [0], "q_min": 0, "freqs": pack_freqs(freqs)}),
                 [[(n, words)]])
    w.finish({})
    data = buf.getvalue()
    assert len(data) < 300
    assert int(tqcodec.load(data)["z"].abs().sum()) == 0  # legitimately 16 MiB of zeros
    with pytest.raises(TqzError) as e:
        tqcodec.load(data, limits=Limits(max_tensor_bytes=(n * 4) - 1))
    assert e.value.code == "LIMIT_EXCEEDED"
