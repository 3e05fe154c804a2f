"""tqcodec.io.sources: reading a .tqz front to back (spec §10.1) from non-seekable streams (pipes,
streams of tiny reads), and front to back in time linear in the tensor count.

Issue 6 part 2: ``iter_tensors(fileobj)`` yields each tensor as its last chunk arrives, holds
about one tensor at a time, and a stream that stops early is TRUNCATED with nothing written.
(Standard input and output through the CLI: tests/test_cli.py.)
"""
from __future__ import annotations

import gc
import io
import os
import threading
import time
import tracemalloc

import pytest
import torch

import tqcodec
from tqcodec.errors import TqzError
from tqcodec.format.manifest import TensorRecord
from tqcodec.format.writer import ContainerWriter
from tests.helpers import bit_view, layered_model


class SlowPipe:
    """A real OS pipe fed by a thread in small pieces with sleeps.

    ``gates``: {position: Event}; the writer stops at each position until its event is set
    (or 10 s pass), so a test can prove the reader got something before those bytes existed.
    ``stop_after``: close the pipe after this many bytes (the writer goes away: EOF).
    """

    def __init__(self, data: bytes, piece: int = 997, pause: float = 0.0005, gates: dict | None = None,
                 stop_after: int | None = None):
        r, w = os.pipe()
        self.reader = os.fdopen(r, "rb")
        self._w = w
        self.data = data
        self.piece, self.pause = piece, pause
        self.gates = dict(sorted((gates or {}).items()))
        self.stop_after = stop_after
        self.written = 0
        self.thread = threading.Thread(target=self._feed, daemon=True)
        self.thread.start()

    def _feed(self) -> None:
        end = len(self.data) if self.stop_after is None else self.stop_after
        try:
            while self.written < end:
                limit = end
                for pos, ev in self.gates.items():
                    if self.written >= pos:
                        ev.wait(timeout=10)
                    else:
                        limit = min(limit, pos)
                        break
                n = min(self.piece, limit - self.written)
                os.write(self._w, self.data[self.written:self.written + n])
                self.written += n
                time.sleep(self.pause)
        except BrokenPipeError:
            pass
        finally:
            os.close(self._w)

    def close(self) -> None:
        for ev in self.gates.values():
            ev.set()
        self.reader.close()
        self.thread.join(timeout=10)


def test_slow_pipe_yields_tensors_before_the_end_arrives():
    sd = layered_model()
    data = tqcodec.encode_bytes(sd)
    expect = tqcodec.load(data)
    tail = 4 + 16 * len(sd) + 32  # index and footer
    half, end = threading.Event(), threading.Event()
    pipe = SlowPipe(data, gates={len(data) // 2: half, len(data) - tail: end})
    got = {}
    try:
        for name, t in tqcodec.iter_tensors(pipe.reader):
            # the writer waits at each gate until we open it; were a tensor only handed out later
            # (at the end of the file), we would not get here before the 10 s gate timeout
            if not got:
                assert not half.is_set() and pipe.written <= len(data) // 2
                half.set()
            got[name] = t
            if len(got) == len(sd) - 1:  # all but the trailing alias, before index and footer exist
                assert not end.is_set() and pipe.written <= len(data) - tail
                end.set()
    finally:
        pipe.close()
    assert list(got) == list(expect)
    for k in expect:
        assert torch.equal(got[k], expect[k]), k


@pytest.mark.parametrize("cut", [10, 200, 0.5, -40])
def test_pipe_that_stops_midway_is_truncated(cut):
    data = tqcodec.encode_bytes(layered_model())
    stop = int(len(data) * cut) if isinstance(cut, float) else (cut if cut > 0 else len(data) + cut)
    pipe = SlowPipe(data, piece=4096, pause=0, stop_after=stop)
    try:
        with pytest.raises(TqzError) as ei:
            for _ in tqcodec.iter_tensors(pipe.reader):
                pass
    finally:
        pipe.close()
    assert ei.value.code == "TRUNCATED"


def test_streaming_holds_about_one_tensor():
    """8 tensors of 2 MiB through a pipe: traced allocations peak near one tensor, not the file."""
    g = torch.Generator().manual_seed(1)
    tensor_bytes = 2 << 20
    sd = {f"t{i}": torch.randn(tensor_bytes // 4, generator=g).reshape(512, -1) for i in range(8)}
    data = tqcodec.encode_bytes(sd, lossless=True)
    assert len(data) > 7 * tensor_bytes
    pipe = SlowPipe(data, piece=1 << 16, pause=0)
    n = 0
    tracemalloc.start()
    try:
        for _, t in tqcodec.iter_tensors(pipe.reader):
            n += 1
            del t
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        pipe.close()
    assert n == 8
    # a tensor's payload bytes, their join, the decoded array (and the writer thread's pieces)
    assert peak < 3.5 * tensor_bytes, f"peak {peak / 2**20:.1f} MiB for {len(data) / 2**20:.1f} MiB of file"


# --- many tensors, front to back --------------------------------------------------------------

def _many_tensors(n: int) -> bytes:
    buf = io.BytesIO()
    w = ContainerWriter(buf)
    for i in range(n):
        w.add_tensor(TensorRecord(f"t{i}", "float32", (0,), "raw", {"codec": "none"}), [])
    w.add_tensor(TensorRecord("tied", "float32", (0,), "alias", {"of": n - 1}), [])
    w.finish({})
    return buf.getvalue()


def test_many_tensors_decode_in_linear_time():
    """Files of many empty tensors: load was quadratic in the tensor count (an alias lookup over all
    records per tensor; 2^20 tensors fit in a 64 MiB manifest: hours), now it is linear. Compared
    as a ratio of two sizes, in this process's CPU time (the files have no chunks, so no worker
    runs), with the cyclic garbage collector off while timing (its passes grow with every object
    alive, which made 8x the tensors take 17x): 8x the tensors take ~9x the time, quadratic ~64x.
    (4x the tensors against a bound of 9x, collector on, took 10.7x beside a benchmark.)"""
    small, big = _many_tensors(1500), _many_tensors(12000)

    def timed(data: bytes) -> float:
        gc.collect()
        gc.disable()  # the cyclic collector's passes grow with every object alive: not the decoder's work
        try:
            t0 = time.process_time()
            out = tqcodec.load(data)
            elapsed = time.process_time() - t0
        finally:
            gc.enable()
        assert "tied" in out
        return elapsed

    # alternated, best of 4 each: a burst of load from other processes hits both sizes alike
    pairs = [(timed(big), timed(small)) for _ in range(4)]
    ratio = min(b for b, _ in pairs) / min(s for _, s in pairs)
    assert ratio < 24, f"12000 tensors took {ratio:.1f}x the time of 1500 (quadratic gives ~64x)"


# --- a stream of tiny reads -------------------------------------------------------------------

def test_streaming_decode_from_a_non_seekable_stream(state_dict):
    data = tqcodec.encode_bytes(state_dict)

    class Pipe(io.RawIOBase):
        def __init__(self, b: bytes):
            self.b, self.pos = b, 0

        def readable(self):
            return True

        def readinto(self, buf):
            n = min(len(buf), 7, len(self.b) - self.pos)  # tiny reads, like a slow pipe
            buf[:n] = self.b[self.pos:self.pos + n]
            self.pos += n
            return n

    got = dict(tqcodec.iter_tensors(Pipe(data)))
    ref = tqcodec.load(data)
    assert list(got) == list(ref)
    assert all(torch.equal(bit_view(got[k]), bit_view(ref[k])) for k in ref)
