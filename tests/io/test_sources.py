"""tqcodec.io.sources: reading a .tqz front to back (spec §10.1) from non-seekable streams (pipes,
streams of tiny reads), and front to back in time linear in the tensor count.

Issue 6 part 2: ``iter_tensors(fileobj)`` yields each tensor as its last chunk arrives, holds
about one tensor at a time, and a stream that stops early is TRUNCATED with nothing written.
(Standard input and output through the CLI: tests/test_cli.py.)
"""
from __future__ import annotations

import io
import os
import subprocess
import sys
import threading
import time
import tracemalloc
from pathlib import Path

import pytest
import torch

import tqcodec
from tqcodec.errors import TqzError
from tqcodec.format.manifest import TensorRecord
from tqcodec.format.writer import ContainerWriter
from tests.helpers import bit_view

REPO = Path(__file__).resolve().parents[2]


def model(n: int = 8, rows: int = 64, cols: int = 96, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {f"layer{i}.weight": torch.randn(rows, cols, generator=g) * 0.05 for i in range(n)}
    sd["layer0.bias"] = torch.zeros(rows)
    sd["head.weight"] = sd["layer0.weight"]  # tied: an alias, complete when the position passes it
    return sd


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
    sd = model()
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
    data = tqcodec.encode_bytes(model())
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


# --- standard input and output, as a user runs them --------------------------------------------

def _cmd() -> list[str]:
    return [sys.executable, "-m", "tqcodec.cli"]


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _saved(tmp_path, sd) -> Path:
    from safetensors.torch import save_file
    src = tmp_path / "m.safetensors"
    save_file({k: v.clone() for k, v in sd.items()}, src)  # safetensors input: no shared storage
    return src


def test_cli_stdout_and_stdin_in_process(tmp_path):
    from safetensors.torch import load_file
    from typer.testing import CliRunner

    from tqcodec.cli import app
    runner = CliRunner()
    src = _saved(tmp_path, model(n=3))
    enc = runner.invoke(app, ["encode", str(src), "-o", "-"])
    assert enc.exit_code == 0, enc.stderr
    assert enc.stdout_bytes == tqcodec.encode_bytes(tqcodec.io.files.read_model(src))  # only the file
    assert "bits/param" in enc.stderr  # the summary goes to stderr
    out = tmp_path / "out.safetensors"
    dec = runner.invoke(app, ["decode", "-", "-o", str(out)], input=enc.stdout_bytes)
    assert dec.exit_code == 0, dec.stderr
    expect = tqcodec.load(enc.stdout_bytes)
    back = load_file(out)
    assert set(back) == set(expect) and all(torch.equal(back[k], expect[k]) for k in expect)

    # a stream cut short: exit 1, one line naming <stdin> and TRUNCATED, no output, no temp file
    for cut in (5, len(enc.stdout_bytes) // 2, len(enc.stdout_bytes) - 1):
        out2 = tmp_path / "cut.safetensors"
        r = runner.invoke(app, ["decode", "-", "-o", str(out2)], input=enc.stdout_bytes[:cut])
        err = r.stderr.strip().splitlines()
        assert r.exit_code == 1 and len(err) == 1 and "TRUNCATED" in err[0] and "<stdin>" in err[0], r.stderr
        assert not out2.exists() and not list(tmp_path.glob(".*.part")) and r.stdout == ""

    # an encoding error: nothing on stdout, one line
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not safetensors at all")
    r = runner.invoke(app, ["encode", str(bad), "-o", "-"])
    assert r.exit_code == 1 and r.stdout_bytes == b"" and "BAD_INPUT" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    r = runner.invoke(app, ["decode", "-"], input=enc.stdout_bytes)  # no -o: refused before reading
    assert r.exit_code == 1 and "BAD_OPTION" in r.stderr


def test_real_pipeline_encode_stdout_into_decode_stdin(tmp_path):
    """``tqz encode m -o - | tqz decode - -o out.safetensors`` through an OS pipe, the encoder's
    stderr a terminal (so it draws its progress bar, which must not land in the .tqz on stdout)."""
    import pty

    from safetensors.torch import load_file
    sd = model(n=4)
    src = _saved(tmp_path, sd)
    out = tmp_path / "out.safetensors"
    master, slave = pty.openpty()
    try:
        enc = subprocess.Popen(_cmd() + ["encode", str(src), "-o", "-"], stdout=subprocess.PIPE,
                               stderr=slave, env=_env(), cwd=tmp_path)
        os.close(slave)
        slave = -1
        dec = subprocess.Popen(_cmd() + ["decode", "-", "-o", str(out)], stdin=enc.stdout,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(), cwd=tmp_path)
        enc.stdout.close()
        dout, derr = dec.communicate(timeout=120)
        enc.wait(timeout=120)
    finally:
        if slave >= 0:
            os.close(slave)
        os.close(master)
    assert enc.returncode == 0 and dec.returncode == 0, derr
    expect = tqcodec.load(tqcodec.encode_bytes(tqcodec.io.files.read_model(src)))
    back = load_file(out)
    assert set(back) == set(expect) and all(torch.equal(back[k], expect[k]) for k in expect)


def test_encode_to_closed_pipe_is_one_line(tmp_path):
    from safetensors.torch import save_file
    src = tmp_path / "m.safetensors"
    save_file({"w": torch.randn(256, 256)}, src)
    p = subprocess.Popen(_cmd() + ["encode", str(src), "-o", "-"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, env=_env(), cwd=tmp_path)
    p.stdout.close()  # the reader went away before a byte was written
    _, err = p.communicate(timeout=120)
    lines = err.decode().strip().splitlines()
    assert p.returncode == 1 and len(lines) == 1 and "IO_ERROR" in lines[0], err


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
    as a ratio of two sizes, so a busy machine does not matter: 4x the tensors, ~4x the time."""
    small, big = _many_tensors(3000), _many_tensors(12000)

    def best(data: bytes) -> float:
        times = []
        for _ in range(2):
            t0 = time.perf_counter()
            out = tqcodec.load(data)
            times.append(time.perf_counter() - t0)
        assert "tied" in out
        return min(times)

    ratio = best(big) / best(small)
    assert ratio < 9, f"12000 tensors took {ratio:.1f}x the time of 3000 (quadratic gives ~16x)"


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
