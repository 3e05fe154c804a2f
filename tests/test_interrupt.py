"""Ctrl-C (issue 16): ``tqz encode`` and ``tqz decode`` interrupted by SIGINT, sent to the whole
process group as a terminal sends it, while they work (with ``-j 2`` and with the default): one
line, exit status 130, no ``.part`` or other new file, no process of theirs left, the input
unchanged. The Python API raises KeyboardInterrupt after the same cleanup, and a KeyboardInterrupt
that torch's writer turned into a RuntimeError is a KeyboardInterrupt again.

The commands run as subprocesses on models big enough to take seconds; each is interrupted as
soon as it is seen working (its ``.part`` file, its worker processes, its input open), not after a
guessed delay.
"""
from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch

import tqcodec
from tqcodec import parallel
from tqcodec.coding import workers
from tqcodec.io import files

ROOT = Path(__file__).resolve().parent.parent
WAIT_S = 90  # for the command to be seen working (it loads torch first; the machine may be busy)


def weights(n: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {f"layer{i}.weight": torch.randn(1024, 1024, generator=g) * 0.05 for i in range(n)}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, bytes]:
    """A model to encode (--bits 3, tensor by tensor: seconds of work) and a .tqz file to decode
    (12M parameters: about a second of range decoding)."""
    d = tmp_path_factory.mktemp("inputs")
    torch.save(weights(4), d / "m.pt")
    tqcodec.save(weights(12), d / "m.tqz", mode="uniform")
    return {"m.pt": (d / "m.pt").read_bytes(), "m.tqz": (d / "m.tqz").read_bytes()}


def _descendants(proc: psutil.Process) -> list[psutil.Process]:
    try:
        return proc.children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _cmdline(p: psutil.Process) -> str:
    try:
        return " ".join(p.cmdline())
    except psutil.Error:
        return ""


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _as_at_a_terminal() -> None:
    """SIGINT as a command started at a terminal has it: default, not blocked. A test run started
    in the background of a non-interactive shell (a CI job) inherits SIGINT ignored, and ignored
    signals stay ignored across exec."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


pytestmark = pytest.mark.usefixtures("python_handles_ctrl_c")  # tests/conftest.py


def interrupt(tmp_path: Path, args: list[str], ready, stdin: bytes = None) -> tuple[subprocess.CompletedProcess, list]:
    """Run ``tqz ARGS`` in ``tmp_path`` in a process group of its own; once ``ready(process,
    descendants)`` is true, send SIGINT to the group. ``stdin``: bytes written to its standard input, which is
    then held open until it exits (a stalled pipe). Returns the finished process and every
    descendant seen, with its command line."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.Popen([sys.executable, "-m", "tqcodec.cli"] + args, cwd=tmp_path, env=env,
                         stdin=subprocess.DEVNULL if stdin is None else subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                         preexec_fn=_as_at_a_terminal)
    if stdin is not None:
        p.stdin.write(stdin)
        p.stdin.flush()
    me = psutil.Process(p.pid)
    seen: dict[int, tuple[psutil.Process, str]] = {}
    try:
        deadline = time.monotonic() + WAIT_S
        while True:
            kids = _descendants(me)
            for k in kids:  # the latest command line: a process just forked has its parent's
                seen[k.pid] = (k, _cmdline(k) or seen.get(k.pid, (k, ""))[1])
            if ready(me, kids):
                break
            assert p.poll() is None, f"tqz {' '.join(args)} ended before it was interrupted: {p.stderr.read()!r}"
            assert time.monotonic() < deadline, f"tqz {' '.join(args)} was never seen working"
            time.sleep(0.02)
        os.killpg(p.pid, signal.SIGINT)
        sent = time.monotonic()
        if stdin is not None:  # still open until it exits: what it reads stalls
            p.wait(timeout=60)
            p.stdin.close()
            p.stdin = None
        out, err = p.communicate(timeout=60)
        exit_s = time.monotonic() - sent
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    result = subprocess.CompletedProcess(p.args, p.returncode, out.decode(), err.decode())
    result.exit_s = exit_s  # from the SIGINT to its exit
    return result, list(seen.values())


def assert_cleaned_up(tmp_path: Path, result: subprocess.CompletedProcess, seen: list,
                      inputs: dict[str, bytes]) -> None:
    assert result.returncode == 130, result.stderr
    assert result.stderr == "tqz: interrupted\n"  # one line: no traceback, from it or its workers
    assert sorted(os.listdir(tmp_path)) == sorted(inputs)  # no .part, no output, nothing else
    for name, data in inputs.items():
        assert hashlib.sha256((tmp_path / name).read_bytes()).digest() == hashlib.sha256(data).digest()
    deadline = time.monotonic() + 15  # the multiprocessing helpers exit when they see it gone
    while any(_alive(k) for k, _ in seen) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [(cmd, k.pid) for k, cmd in seen if _alive(k)] == []


def _has_part(tmp_path: Path) -> bool:
    return any(n.endswith(".part") for n in os.listdir(tmp_path))


def _forkservers(kids) -> int:
    """The fork server and the pool workers it forked (they keep its command line)."""
    return sum("multiprocessing.forkserver" in _cmdline(k) for k in kids)


@pytest.mark.parametrize("case", ["j2-starting", "j2-working", "default"])
def test_ctrl_c_during_encode(tmp_path, inputs, case):
    """j2-starting: while the fork server loads (the pool's workers not forked yet: a Ctrl-C
    there must reach neither); j2-working: both workers encoding, the output begun; default: one
    process, the output begun."""
    (tmp_path / "m.pt").write_bytes(inputs["m.pt"])
    jobs = [] if case == "default" else ["-j", "2"]
    ready = {"j2-starting": lambda me, kids: _forkservers(kids) == 1,
             "j2-working": lambda me, kids: _forkservers(kids) >= 3 and _has_part(tmp_path),
             "default": lambda me, kids: _has_part(tmp_path)}[case]
    result, seen = interrupt(tmp_path, ["encode", "m.pt", "--bits", "3", "--tq-scope", "tensor", "-o", "m.tqz"]
                             + jobs, ready)
    if case == "j2-working":
        assert sum("multiprocessing.forkserver" in cmd for _, cmd in seen) >= 3
    assert_cleaned_up(tmp_path, result, seen, {"m.pt": inputs["m.pt"]})


@pytest.mark.parametrize("jobs", [["-j", "2"], []], ids=["j2", "default"])
def test_ctrl_c_during_decode(tmp_path, inputs, jobs):
    (tmp_path / "m.tqz").write_bytes(inputs["m.tqz"])
    result, seen = interrupt(tmp_path, ["decode", "m.tqz", "-o", "out.pt"] + jobs, _reading("m.tqz"))
    assert_cleaned_up(tmp_path, result, seen, {"m.tqz": inputs["m.tqz"]})


def _reading(name: str):
    """Ready: the process has ``name`` open (the decode has begun; with ``-j 2`` the file is read
    only as far ahead of the decode as the workers can use, so it stays open until near the end)."""
    def ready(me: psutil.Process, kids) -> bool:
        try:
            return any(os.path.basename(f.path) == name for f in me.open_files())
        except psutil.Error:
            return False
    return ready


def test_ctrl_c_while_decoding_a_stalled_pipe(tmp_path, inputs):
    """``tqz decode -`` whose standard input stops halfway (a stalled download): the reading thread
    waits in a read that may never return; a Ctrl-C does not wait for it (it waited 10 s)."""
    data = inputs["m.tqz"]
    # the half written (far more than a pipe holds) has been read once the write returns: the
    # decode has begun, and then waits in a read of the rest
    result, seen = interrupt(tmp_path, ["decode", "-", "-o", "out.pt", "-j", "2"], lambda me, kids: True,
                             stdin=data[:len(data) // 2])
    assert_cleaned_up(tmp_path, result, seen, {})
    assert result.exit_s < 9  # not the 10 s the reading thread was given before (a bound, not a speed target)


# --- the Python API ---------------------------------------------------------------------------------

def _sigint_when(condition, timeout: float = WAIT_S) -> threading.Thread:
    """SIGINT to this process (its main thread raises KeyboardInterrupt) once ``condition()``."""
    def watch():
        deadline = time.monotonic() + timeout
        while not condition() and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGINT)
    t = threading.Thread(target=watch, daemon=True)
    t.start()
    return t


def test_save_interrupted_cleans_up_and_raises(tmp_path, monkeypatch):
    pools, procs = [], []
    make = parallel.make_pool
    monkeypatch.setattr(parallel, "make_pool", lambda *a, **k: pools.append(make(*a, **k)) or pools[-1])

    def working() -> bool:  # both workers of the pool running, the output begun
        running = dict(getattr(pools[0], "_processes", None) or {}) if pools else {}
        if len(running) >= 2 and _has_part(tmp_path):
            procs.extend(running.values())
            return True
        return False

    watcher = _sigint_when(working)
    with pytest.raises(KeyboardInterrupt):
        tqcodec.save(weights(4), tmp_path / "m.tqz", bits=3, tq_scope="tensor", jobs=2)
    watcher.join()
    assert os.listdir(tmp_path) == []
    # ended by this process (not left to finish their tensors), and reaped
    assert len(procs) == 2 and [p.exitcode for p in procs] == [-signal.SIGTERM] * 2
    left = [k for k in _descendants(psutil.Process()) if _alive(k) and "forkserver" in _cmdline(k)]
    assert len(left) <= 1  # at most the fork server itself (kept for the next pool), no worker


def test_load_interrupted_stops_the_workers_and_raises(tmp_path, monkeypatch, inputs):
    src = tmp_path / "m.tqz"
    src.write_bytes(inputs["m.tqz"])
    fresh = workers.Pool()
    monkeypatch.setattr(workers, "_POOL", fresh)
    sent = []

    def working() -> bool:  # a worker is decoding a chunk
        with fresh.lock:
            if any(w.current is not None for w in fresh.workers):
                sent.append(time.monotonic())
                return True
            return False

    watcher = _sigint_when(working)
    with pytest.raises(KeyboardInterrupt):
        for _ in range(50):  # interrupted during one of them
            tqcodec.load(src, jobs=2)
    raised = time.monotonic()
    watcher.join()
    assert sent and raised - sent[0] < 5  # not after the decode (a bound, not a speed target)
    assert fresh.closing and workers._POOL is None  # stopped and forgotten, wherever the Ctrl-C landed
    again = tqcodec.load(src, jobs=2)  # a new pool, whatever state the stopped one was left in
    assert workers._POOL is not None and workers._POOL is not fresh
    want = tqcodec.load(src, jobs=1)
    assert list(again) == list(want) and all(torch.equal(again[k], want[k]) for k in want)
    assert sorted(os.listdir(tmp_path)) == ["m.tqz"]


def test_torch_writer_keyboard_interrupt_stays_one(tmp_path, monkeypatch):
    """torch.save's C++ writer turns a KeyboardInterrupt raised in the file's write into a
    RuntimeError ("unexpected pos"); write_model raises KeyboardInterrupt and leaves no file."""
    calls = []
    real = files._KeepOSError.write

    def write(self, b):
        calls.append(len(b))
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)  # the handler runs in this write: KeyboardInterrupt here
        return real(self, b)

    monkeypatch.setattr(files._KeepOSError, "write", write)
    with pytest.raises(KeyboardInterrupt):
        files.write_model(weights(2), tmp_path / "out.pt", overwrite=False)
    assert len(calls) >= 3 and os.listdir(tmp_path) == []
