"""tqcodec.io.files: atomic outputs, and the model files read and written.

Faults while writing (issue 8): nothing a user had is lost, nothing partial is left.

Outputs are written to ``.<name>.<random>.part`` in the target directory, flushed, fsynced and
renamed over the output (``tqcodec.io.files.atomic_output``). These tests check that, and that:

- ENOSPC (simulated in ``write`` and in ``fsync``), a real ``EFBIG`` from ``RLIMIT_FSIZE`` and a
  KeyboardInterrupt mid-write leave the previous output byte-identical and no temporary file;
- a process killed with SIGKILL mid-write leaves the previous output byte-identical; it can leave
  its ``.<name>.<random>.part`` file (no code runs after SIGKILL), and never a partial output;
- the input is never opened for writing, and ``tqz decode``/``encode`` refuse to write over it (those
  run the CLI: tests/test_cli.py);
- without ``--force`` an output that appears while encoding is not overwritten (no check-then-write race).

Model files are read safely: a pickle that would run code is refused and never run (``torch.load``
once, with ``weights_only=True``); tensor subclasses, ``.pt`` files that are not state dicts, corrupt
``.safetensors`` and unknown suffixes are ``BAD_INPUT``.
"""
from __future__ import annotations

import errno
import os
import re
import pickle
import signal
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import tqcodec
from tqcodec.io.files import read_model
from tests.helpers import MyTensor, RunsCode, RunsEval, code_of, fail_writes_after, listing, small_state_dict

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def existing(tmp_path) -> tuple[Path, bytes]:
    """An output file from an earlier run, which no failed run may damage."""
    out = tmp_path / "model.tqz"
    tqcodec.save(small_state_dict(7), out)
    return out, out.read_bytes()


# --- the atomic-output protocol ---------------------------------------------------------------

@pytest.mark.skipif(not os.path.exists("/proc/self/fd"), reason="names fsynced files through /proc")
@pytest.mark.parametrize("overwrite", [True, False])
def test_output_is_written_to_a_temp_file_fsynced_then_renamed(tmp_path, monkeypatch, overwrite):
    """Replacing (overwrite=True) renames the temporary file over the output; without overwrite
    (the default) the temporary file is hard-linked to the output's name, which fails if the name
    exists, then removed: the same protocol, and an existing output is never replaced."""
    events = []
    real_fsync, real_replace, real_link = os.fsync, os.replace, os.link

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(a, b):
        events.append(("replace", str(a), str(b)))
        return real_replace(a, b)

    def link(a, b):
        events.append(("replace", str(a), str(b)))  # the rename of the no-overwrite protocol
        return real_link(a, b)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "link", link)
    out = tmp_path / "m.tqz"
    tqcodec.save(small_state_dict(), out, overwrite=overwrite)
    file_fsyncs = [e for e in events if e[0] == "fsync" and str(e[1]).endswith(".part")]
    replaces = [e for e in events if e[0] == "replace"]
    assert len(file_fsyncs) == 1 and len(replaces) == 1
    tmp = replaces[0][1]
    assert Path(tmp).parent == tmp_path and Path(tmp).name.startswith(".m.tqz.") and tmp.endswith(".part")
    assert replaces[0][2] == str(out)
    assert events.index(file_fsyncs[0]) < events.index(replaces[0])  # data durable before the rename
    assert listing(tmp_path) == ["m.tqz"]
    assert tqcodec.load(out).keys() == small_state_dict().keys()


def test_new_outputs_get_the_umask_mode_not_0600(tmp_path):
    old = os.umask(0o022)
    try:
        tqcodec.save(small_state_dict(), tmp_path / "a.tqz")
        tqcodec.io.files.write_model(small_state_dict(), tmp_path / "a.safetensors", overwrite=False)
    finally:
        os.umask(old)
    for name in ("a.tqz", "a.safetensors"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o644, name


# --- failures mid-write --------------------------------------------------------------------------

@pytest.mark.parametrize("limit", [0, 100, 4000])  # the file is about 4.9 KB
def test_enospc_mid_write_keeps_the_old_file(existing, monkeypatch, limit):
    out, before = existing
    fail_writes_after(monkeypatch, limit, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    with pytest.raises(tqcodec.TqzError) as e:
        tqcodec.save(small_state_dict(8), out, overwrite=True)
    assert e.value.code == "IO_ERROR" and "No space left" in str(e.value) and str(out) in str(e.value)
    assert out.read_bytes() == before
    assert listing(out.parent) == [out.name]


def test_enospc_on_fsync_keeps_the_old_file(existing, monkeypatch):
    out, before = existing

    def fsync(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(tqcodec.TqzError) as e:
        tqcodec.save(small_state_dict(8), out, overwrite=True)
    assert e.value.code == "IO_ERROR"
    assert out.read_bytes() == before and listing(out.parent) == [out.name]


def test_keyboard_interrupt_mid_write_keeps_the_old_file(existing, monkeypatch):
    out, before = existing
    fail_writes_after(monkeypatch, 1000, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        tqcodec.save(small_state_dict(8), out, overwrite=True)
    assert out.read_bytes() == before and listing(out.parent) == [out.name]


def test_missing_output_directory(tmp_path):
    with pytest.raises(tqcodec.TqzError) as e:
        tqcodec.save(small_state_dict(), tmp_path / "no" / "such" / "m.tqz")
    assert e.value.code == "IO_ERROR"
    assert listing(tmp_path) == []


def _child(code: str, **kw) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def test_real_write_error_from_the_os_keeps_the_old_file(existing):
    """RLIMIT_FSIZE makes the kernel fail the write (EFBIG) part-way, as a full disk would."""
    out, before = existing
    code = f"""
        import resource, signal, sys, torch, tqcodec
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        g = torch.Generator().manual_seed(0)
        tensors = {{"w": torch.randn(512, 1024, generator=g)}}  # 2 MiB, stored raw
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
        try:
            tqcodec.save(tensors, {str(out)!r}, lossless=True, overwrite=True)
        except tqcodec.TqzError as e:
            print(e.code, e.message)
            sys.exit(3)
    """
    p = _child(code)
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 3, stderr
    assert stdout.startswith("IO_ERROR") and "too large" in stdout.lower()
    assert out.read_bytes() == before and listing(out.parent) == [out.name]


KILL_CHILD = """
    import os, sys, time, torch, tqcodec
    out = sys.argv[1] if len(sys.argv) > 1 else {out!r}
    g = torch.Generator().manual_seed(0)
    tensors = {{f"layer{{i}}.weight": torch.randn(1024, 1024, generator=g) for i in range(12)}}  # 48 MiB
    real_fdopen = os.fdopen
    class Slow:
        def __init__(self, f): self.f, self.n = f, 0
        def write(self, b):
            r = self.f.write(b)
            self.n += len(b)
            if self.n > (4 << 20) and {pause}:  # well inside the file: tell the parent, wait to be killed
                self.f.flush()
                print("MIDWRITE", flush=True)
                time.sleep(600)
            return r
        def __getattr__(self, k): return getattr(self.f, k)
        def __enter__(self): return self
        def __exit__(self, *e): self.f.close()
    os.fdopen = lambda fd, *a, **k: Slow(real_fdopen(fd, *a, **k))
    print("START", flush=True)
    tqcodec.save(tensors, out, lossless=True, overwrite=True)
    print("DONE", flush=True)
"""


def test_sigkill_mid_write_keeps_the_old_file(existing):
    out, before = existing
    p = _child(KILL_CHILD.format(out=str(out), pause=True))
    try:
        assert p.stdout.readline().strip() == "START"
        assert p.stdout.readline().strip() == "MIDWRITE"
        parts = [n for n in listing(out.parent) if n != out.name]
        assert len(parts) == 1 and os.path.getsize(out.parent / parts[0]) > (4 << 20)  # really mid-write
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=60)
    finally:
        p.kill()
        p.stdout.close()
        p.stderr.close()
    assert p.returncode == -signal.SIGKILL
    assert out.read_bytes() == before
    assert tqcodec.load(out).keys() == small_state_dict(7).keys()
    # what SIGKILL can leave: the temporary file, named so it is never taken for the output
    left = [n for n in listing(out.parent) if n != out.name]
    assert len(left) == 1 and left[0].startswith(".model.tqz.") and left[0].endswith(".part")
    # a later run is not disturbed by it
    tqcodec.save(small_state_dict(9), out, overwrite=True)
    assert tqcodec.load(out).keys() == small_state_dict(9).keys()


def test_sigkill_at_an_unplanned_moment(existing):
    """Kill as soon as the temporary file has bytes: the output is the old file or the whole new one."""
    out, before = existing
    p = _child(KILL_CHILD.format(out=str(out), pause=False))
    try:
        assert p.stdout.readline().strip() == "START"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and p.poll() is None:
            parts = [q for q in out.parent.iterdir() if q.name.endswith(".part")]
            if any(q.exists() and q.stat().st_size > 0 for q in parts):
                break
            time.sleep(0.001)
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=60)
    finally:
        p.kill()
        p.stdout.close()
        p.stderr.close()
    after = out.read_bytes()
    if after != before:  # the child finished first: then the output is complete
        assert len(tqcodec.load(out)) == 12
    assert all(n == out.name or (n.startswith(".model.tqz.") and n.endswith(".part")) for n in listing(out.parent))


# --- without overwrite: an output that appears meanwhile is kept ----------------------------------------


def test_no_force_never_overwrites_an_output_that_appears_meanwhile(tmp_path, monkeypatch):
    out = tmp_path / "race.tqz"
    real_fdopen = os.fdopen

    class Racer:
        """While the encoder writes, another program creates the output."""

        def __init__(self, f):
            self.f = f

        def write(self, b):
            if not out.exists():
                out.write_bytes(b"someone else's file")
            return self.f.write(b)

        def __getattr__(self, k):
            return getattr(self.f, k)

        def __enter__(self):
            return self

        def __exit__(self, *e):
            self.f.close()

    monkeypatch.setattr(os, "fdopen", lambda fd, *a, **k: Racer(real_fdopen(fd, *a, **k)))
    with pytest.raises(tqcodec.TqzError) as e:
        tqcodec.save(small_state_dict(), out, overwrite=False)
    assert e.value.code == "OUTPUT_EXISTS"
    assert out.read_bytes() == b"someone else's file"
    assert listing(tmp_path) == ["race.tqz"]


# --- model files read: pickles never run, what is not a state dict is refused -----------------

@pytest.mark.parametrize("how", ["raw-pickle", "torch-zip", "nested-in-state-dict", "eval"])
@pytest.mark.parametrize("suffix", [".pt", ".bin", ".ckpt"])
def test_pickle_with_code_never_runs(tmp_path, marker, monkeypatch, how, suffix):
    p = tmp_path / f"evil{suffix}"
    if how == "raw-pickle":
        p.write_bytes(pickle.dumps({"w": RunsCode()}, protocol=2))
    elif how == "torch-zip":
        torch.save({"w": torch.ones(2), "x": RunsCode()}, p)
    elif how == "nested-in-state-dict":
        torch.save({"state_dict": {"w": torch.ones(2)}, "hook": RunsCode()}, p)
    else:
        torch.save({"w": RunsEval()}, p)
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    with pytest.raises(tqcodec.TqzError) as e:
        read_model(p)
    # the message names what was found (a global of the pickle) and what to do, never "load it unsafely"
    assert e.value.code == "BAD_INPUT" and "never runs their code" in e.value.message
    assert re.search(r"refers to [\w.]+ \(Python code", e.value.message) and "safetensors" in e.value.message
    assert "weights_only=False" not in e.value.message
    assert str(p) in str(e.value)
    assert calls == [True], "torch.load must be called once, with weights_only=True (no fallback)"
    assert not marker.exists(), "the pickle's code ran"


def test_tensor_subclass_in_a_pt_file_is_refused(tmp_path):
    p = tmp_path / "sub.pt"
    torch.save({"w": torch.randn(3).as_subclass(MyTensor)}, p)
    assert code_of(lambda: read_model(p)) == "BAD_INPUT"  # weights_only refuses the class
    # ... and if the user allow-lists the class for torch.load, tqcodec still refuses it
    with torch.serialization.safe_globals([MyTensor]):
        with pytest.raises(tqcodec.TqzError) as e:
            read_model(p)
    assert e.value.code == "BAD_INPUT" and "subclass" in e.value.message


@pytest.mark.parametrize("content", [[torch.ones(2)], torch.ones(2), {}, 7], ids=["list", "tensor", "empty", "int"])
def test_pt_files_that_are_not_state_dicts(tmp_path, content):
    p = tmp_path / "m.pt"
    torch.save(content, p)
    assert code_of(lambda: read_model(p)) == "BAD_INPUT"


def test_complex_in_a_pt_file(tmp_path):
    p = tmp_path / "c.pt"
    torch.save({"c": torch.zeros(2, dtype=torch.complex64)}, p)
    with pytest.raises(tqcodec.TqzError) as e:
        read_model(p)
    assert e.value.code == "BAD_INPUT" and "complex" in e.value.message


def test_corrupt_safetensors_is_bad_input(tmp_path):
    p = tmp_path / "m.safetensors"
    p.write_bytes(struct.pack("<Q", 1 << 62) + b"{}")  # header length far past the file
    assert code_of(lambda: read_model(p)) == "BAD_INPUT"
    p.write_bytes(b"")
    assert code_of(lambda: read_model(p)) == "BAD_INPUT"
    header = b'{"w":{"dtype":"F32","shape":[4],"data_offsets":[0,999999]}}'
    p.write_bytes(struct.pack("<Q", len(header)) + header + b"\x00" * 16)
    assert code_of(lambda: read_model(p)) == "BAD_INPUT"


def test_unknown_suffix_and_directory(tmp_path):
    p = tmp_path / "m.onnx"
    p.write_bytes(b"x")
    assert code_of(lambda: read_model(p)) == "BAD_INPUT"
    assert code_of(lambda: read_model(tmp_path)) == "IO_ERROR"
    assert code_of(lambda: read_model(tmp_path / "missing.pt")) == "IO_ERROR"


# --- a save that fails while encoding ---------------------------------------------------------

def test_failed_save_leaves_previous_file(tmp_path):
    path = tmp_path / "m.tqz"
    tqcodec.save({"w": torch.ones(3)}, path)
    before = path.read_bytes()
    with pytest.raises(tqcodec.TqzError):
        tqcodec.save({"w": torch.ones(3), "bad": torch.ones(2, dtype=torch.complex64)}, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.tqz"]


def test_ctrl_c_as_the_temporary_file_appears_leaves_nothing(tmp_path, monkeypatch, python_handles_ctrl_c):
    """A Ctrl-C that lands just after the ``.part`` file is created (before its name is known to
    the cleanup) must still remove it: ``tqz encode`` interrupted there left one behind."""
    import tempfile
    from tqcodec.io import files
    real = tempfile.mkstemp

    def mkstemp_then_ctrl_c(*args, **kwargs):
        made = real(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGINT)  # delivered at once: the handler runs on return
        return made

    monkeypatch.setattr(files.tempfile, "mkstemp", mkstemp_then_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        with files.atomic_output(tmp_path / "out.tqz") as f:
            f.write(b"never")
    assert listing(tmp_path) == []
