"""tqcodec.cli, the tqz command: every test that runs it, through typer's runner or as a
subprocess: encode, decode, info and verify; outputs (never over the input, atomic, --force);
standard input and output; modes and rate targets; Hugging Face folders; URLs."""
from __future__ import annotations

import errno
import json
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import tqcodec
from tqcodec.cli import app
from tqcodec.io import hf
from tests.helpers import (CLASSIC_MODES, HF_FILES, RunsCode, fail_writes_after, layered_model, listing,
                           load_folder, param_count, small_state_dict, toy_model)

ROOT = Path(__file__).resolve().parent.parent

runner = CliRunner()


def tqz(*args: str):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture
def model_pt(tmp_path) -> Path:
    p = tmp_path / "model.pt"
    torch.save(small_state_dict(), p)
    return p


# --- encode, decode, info, verify -------------------------------------------------------------

def test_encode_decode_info_verify(tmp_path, model_pt):
    r = tqz("encode", model_pt)
    assert r.exit_code == 0, r.output
    tqz_path = tmp_path / "model.tqz"
    assert tqz_path.exists() and "bits/param" in r.output
    r = tqz("info", tqz_path)
    assert r.exit_code == 0 and "fc.weight" in r.output and "uniform" in r.output
    r = tqz("info", tqz_path, "--json")
    info = json.loads(r.output)
    assert info["total"]["file_bytes"] == tqz_path.stat().st_size
    assert {t["name"] for t in info["tensors"]} == set(small_state_dict())
    r = tqz("verify", tqz_path)
    assert r.exit_code == 0 and "OK" in r.output
    out = tmp_path / "out.safetensors"
    r = tqz("decode", tqz_path, "-o", out)
    assert r.exit_code == 0, r.output
    from safetensors.torch import load_file
    assert set(load_file(str(out))) == set(small_state_dict())


def test_lossless_cli_is_bit_exact(tmp_path, model_pt):
    assert tqz("encode", model_pt, "--lossless", "-o", tmp_path / "l.tqz").exit_code == 0
    assert tqz("decode", tmp_path / "l.tqz", "-o", tmp_path / "back.pt").exit_code == 0
    back = torch.load(tmp_path / "back.pt", weights_only=True)
    ref = small_state_dict()
    assert list(back) == list(ref)
    assert all(torch.equal(back[k], ref[k]) for k in ref)


def test_nested_state_dict_checkpoint(tmp_path):
    p = tmp_path / "ckpt.pt"
    torch.save({"epoch": 3, "state_dict": small_state_dict()}, p)
    assert tqz("encode", p).exit_code == 0
    assert list(tqcodec.load(tmp_path / "ckpt.tqz")) == list(small_state_dict())


def test_info_escapes_names_a_terminal_would_interpret(tmp_path):
    # spec §5.4 allows U+202E (right-to-left override) and C1 controls in names; printed raw they
    # would reorder or hijack the terminal line.
    path = tmp_path / "m.tqz"
    tqcodec.save({"evil\u202eabc\u0085x": torch.ones(3)}, path)
    result = runner.invoke(app, ["info", str(path)])
    assert result.exit_code == 0, result.output
    assert "evil\\u202eabc\\u0085x" in result.output
    assert "\u202e" not in result.output and "\u0085" not in result.output


def test_info_says_how_each_tensor_is_coded(tmp_path):
    """tq: its bands (runs, or sets of rows by row_band), transform and layout; uniform: granularity."""
    from tqcodec.format.manifest import TensorRecord
    from tqcodec.format.writer import ContainerWriter
    from tqcodec.modes import tq as tq_mode
    import numpy as np
    path = tmp_path / "c.tqz"
    lv = np.arange(24).reshape(6, 4) % 5
    band = np.array([1, 0, 1, 0, 0, 1], dtype=np.uint8)
    s = np.eye(4, 2, dtype=np.float16)
    with open(path, "wb") as out:
        w = ContainerWriter(out)
        _, params, streams = tq_mode.write([lv[band == b] for b in range(2)], [-4, -6], row_band=band)
        w.add_tensor(TensorRecord("by_rows", "float32", (6, 4), "tq", params), streams)
        _, params, streams = tq_mode.write([lv[:2]], [-4], transform=s, layout="in_out")  # k = 2 rows of n = 4
        w.add_tensor(TensorRecord("transformed", "float32", (4, 4), "tq", params), streams)
        w.finish({})
    result = runner.invoke(app, ["info", str(path)])
    assert result.exit_code == 0, result.output
    from tqcodec.plot import allocation_rows
    with tqcodec.open(path) as f:
        assert [r["row_band"] for r in allocation_rows(f)] == [True, False]  # the plot marks it +R
    lines = {line.split()[0]: line for line in result.output.splitlines()[2:]}
    assert lines["by_rows"].endswith("2 bands of rows by row_band")
    assert lines["transformed"].endswith("1 band, transform float16 k=2, layout in_out")
    rows = json.loads(runner.invoke(app, ["info", "--json", str(path)]).output)["tensors"]
    assert [r["coding"] for r in rows] == ["2 bands of rows by row_band", "1 band, transform float16 k=2, layout in_out"]


def test_info_shows_the_manifest_and_whether_it_is_compressed(tmp_path):
    """Spec §5.0: the manifest's stored bytes and ZSTD_MANIFEST, in the text and JSON views; the size is
    the header's Manifest_Length."""
    import struct
    path = tmp_path / "m.tqz"
    tqcodec.save(layered_model(4, 16, 16), path, lossless=True)
    data = path.read_bytes()
    stored = struct.unpack_from("<I", data, 20)[0]
    result = runner.invoke(app, ["info", str(path)])
    assert result.exit_code == 0, result.output
    assert f"format 1.3," in result.output and f"manifest {stored} bytes (zstd)" in result.output
    total = json.loads(runner.invoke(app, ["info", "--json", str(path)]).output)["total"]
    assert total["manifest_bytes"] == stored and total["manifest_compressed"] is True
    tqcodec.save({"w": torch.ones(3)}, path, overwrite=True, lossless=True)  # too small to compress
    total = json.loads(runner.invoke(app, ["info", "--json", str(path)]).output)["total"]
    assert total["manifest_compressed"] is False and total["format_version"] == "1.0"


# --- errors: one line, an exit code -----------------------------------------------------------

def test_pickle_with_code_is_refused_and_never_runs(tmp_path, marker):
    """A .pt pickle that would run code, written by pickle itself or by torch.save: exit 1, BAD_INPUT
    naming the file, the code never runs, no output."""
    for how in ("pickle", "torch.save"):
        folder = tmp_path / how
        folder.mkdir()
        p = folder / "evil.pt"
        if how == "pickle":
            with open(p, "wb") as f:
                pickle.dump({"w": RunsCode()}, f)
        else:
            torch.save({"w": RunsCode()}, p)
        r = tqz("encode", p)
        assert r.exit_code == 1
        assert "BAD_INPUT" in r.output and str(p) in r.output
        assert not marker.exists()
        assert not (folder / "evil.tqz").exists()
        assert sorted(x.name for x in folder.iterdir()) == ["evil.pt"]


@pytest.mark.parametrize("content,code", [
    ({"w": torch.ones(2), "epoch": 3}, "BAD_INPUT"),
    ([torch.ones(2)], "BAD_INPUT"),
    ({"c": torch.ones(2, dtype=torch.complex64)}, "BAD_INPUT"),
])
def test_bad_model_files(tmp_path, content, code):
    p = tmp_path / "m.pt"
    torch.save(content, p)
    r = tqz("encode", p)
    assert r.exit_code == 1 and code in r.output


def test_usage_errors_exit_2(tmp_path, model_pt):
    assert tqz("encode").exit_code == 2
    assert tqz("encode", model_pt, "--snr", "abc").exit_code == 2
    assert tqz("frobnicate").exit_code == 2


def test_bad_option_value_exits_2(tmp_path, model_pt):
    r = tqz("encode", model_pt, "--mode", "zip")
    assert r.exit_code == 2 and "BAD_OPTION" in r.output


# --- outputs: never over the input, never a partial file --------------------------------------

def test_existing_output_needs_force(tmp_path, model_pt):
    assert tqz("encode", model_pt).exit_code == 0
    out = tmp_path / "model.tqz"
    before = out.read_bytes()
    r = tqz("encode", model_pt, "--snr", "20")
    assert r.exit_code == 1 and "OUTPUT_EXISTS" in r.output
    assert out.read_bytes() == before
    assert tqz("encode", model_pt, "--snr", "20", "--force").exit_code == 0
    assert out.read_bytes() != before


@pytest.fixture
def model_files(tmp_path):
    pt = tmp_path / "m.pt"
    torch.save(small_state_dict(), pt)
    tz = tmp_path / "m.tqz"
    tqcodec.save(small_state_dict(), tz)
    return pt, tz


@pytest.mark.parametrize("force", [[], ["--force"]])
def test_decode_refuses_to_write_over_its_input(tmp_path, model_files, force):
    """The input itself, the input under a model-file name, a symlink or a hard link to it."""
    _, tz = model_files
    before = tz.read_bytes()
    r = tqz("decode", tz, "-o", tz, *force)
    assert r.exit_code == 2 and "BAD_OPTION" in r.output
    disguised = tmp_path / "m2.pt"          # a .tqz file under a model-file name
    disguised.write_bytes(before)
    for out in (disguised,):
        r = tqz("decode", disguised, "-o", out, *force)
        assert r.exit_code == 2 and "overwrite the input" in r.output
        assert out.read_bytes() == before
    link = tmp_path / "link.pt"               # a symlink to the input as the output
    link.symlink_to(disguised)
    r = tqz("decode", disguised, "-o", link, *force)
    assert r.exit_code == 2 and "overwrite the input" in r.output
    assert tz.read_bytes() == before and disguised.read_bytes() == before and link.is_symlink()
    pt, _ = model_files                       # a hard link to the input as the output
    assert tqz("encode", pt, "-o", tmp_path / "m3.tqz").exit_code == 0
    before = (tmp_path / "m3.tqz").read_bytes()
    os.link(tmp_path / "m3.tqz", tmp_path / "same.pt")
    r = tqz("decode", tmp_path / "m3.tqz", "-o", tmp_path / "same.pt", *force)
    assert r.exit_code == 2 and "overwrite the input" in r.output
    assert (tmp_path / "m3.tqz").read_bytes() == before


@pytest.mark.parametrize("force", [[], ["--force"]])
def test_encode_refuses_to_write_over_its_input(tmp_path, model_files, force):
    pt, _ = model_files
    before = pt.read_bytes()
    r = tqz("encode", pt, "-o", pt, *force)
    assert r.exit_code == 2 and "overwrite the input" in r.output
    hard = tmp_path / "hard.tqz"
    os.link(pt, hard)
    r = tqz("encode", pt, "-o", hard, *force)
    assert r.exit_code == 2 and "overwrite the input" in r.output
    soft = tmp_path / "soft.tqz"
    soft.symlink_to(pt)
    r = tqz("encode", pt, "-o", soft, *force)
    assert r.exit_code == 2 and "overwrite the input" in r.output
    assert pt.read_bytes() == before and soft.is_symlink()


AUDIT = """
    import json, os, sys
    watched = {os.path.realpath(p) for p in json.loads(sys.argv[1])}
    commands = json.loads(sys.argv[2])
    writes = []
    def is_watched(p):
        try:
            return isinstance(p, (str, bytes, os.PathLike)) and os.path.realpath(os.fsdecode(p)) in watched
        except Exception:
            return False
    def hook(event, args):
        if event == "open" and args and is_watched(args[0]):
            mode, flags = (args[1] if len(args) > 1 else None), (args[2] if len(args) > 2 else 0)
            if (mode and any(c in str(mode) for c in "wax+")) or (flags or 0) & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC):
                writes.append((event, str(args[0])))
        if event in ("os.truncate", "os.remove", "os.rename", "os.replace", "os.chmod", "os.link") and args \
                and any(is_watched(a) for a in args[:2]):
            writes.append((event, str(args[0])))
    sys.addaudithook(hook)
    from tqcodec.cli import app
    for cmd in commands:
        try:
            app(cmd, standalone_mode=False)
        except SystemExit:
            pass
        except Exception as e:
            print("ERR", type(e).__name__, e)
    print("WRITES", json.dumps(writes))
    open(sorted(watched)[0], "ab").close()  # positive control: the hook sees a write-mode open
    print("CONTROL", len(writes))
"""


def test_input_is_never_opened_for_writing(tmp_path):
    """Encode (.pt and .safetensors inputs) and decode under an audit hook that records every
    Python-level open of an input in a writing mode (and renames/removals of it)."""
    import json
    pt, st = tmp_path / "model.pt", tmp_path / "other.safetensors"
    tqcodec.io.files.write_model(small_state_dict(), pt, overwrite=False)
    tqcodec.io.files.write_model(small_state_dict(1), st, overwrite=False)
    tz = tmp_path / "third.tqz"
    tqcodec.save(small_state_dict(2), tz)
    inputs = [pt, st, tz]
    before = {p: (p.read_bytes(), p.stat().st_ino, p.stat().st_mtime_ns) for p in inputs}
    commands = [["encode", str(pt), "--force"], ["encode", str(st), "--force"],
                ["decode", str(tz), "-o", str(tmp_path / "back.pt")],
                ["decode", str(tz), "-o", str(tmp_path / "back.safetensors")]]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(AUDIT), json.dumps([str(p) for p in inputs]),
                        json.dumps(commands)], capture_output=True, text=True, timeout=120, env=env)
    assert "WRITES []" in r.stdout and "CONTROL 1" in r.stdout, r.stdout + r.stderr
    assert "ERR" not in r.stdout, r.stdout
    for p in inputs:
        assert (p.read_bytes(), p.stat().st_ino, p.stat().st_mtime_ns) == before[p], p
    for out in ("model.tqz", "other.tqz", "back.pt", "back.safetensors"):
        assert (tmp_path / out).exists(), out


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_enospc_while_decoding_to_a_model_file(tmp_path, monkeypatch, suffix):
    src = tmp_path / "m.tqz"
    tqcodec.save(small_state_dict(), src)
    out = tmp_path / f"back{suffix}"
    out.write_bytes(b"previous contents")
    fail_writes_after(monkeypatch, 64, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    r = tqz("decode", src, "-o", out, "--force")
    assert r.exit_code == 1 and "IO_ERROR" in r.output and "No space left" in r.output
    assert out.read_bytes() == b"previous contents"
    assert listing(tmp_path) == sorted(["m.tqz", out.name])


# --- as a subprocess --------------------------------------------------------------------------

def test_subprocess_one_line_error_no_traceback(tmp_path):
    bad = tmp_path / "page.tqz"
    bad.write_bytes(b"<html>not a model</html>")
    exe = Path(sys.executable).with_name("tqz")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "tqcodec.cli"]
    for sub in (["info"], ["verify"], ["decode"]):
        p = subprocess.run(cmd + sub + [str(bad)], capture_output=True, text=True, timeout=120)
        assert p.returncode == 1
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in p.stderr
        assert str(bad) in lines[0] and "BAD_MAGIC" in lines[0]
    assert not (tmp_path / "page.pt").exists() and not (tmp_path / "page.decoded.pt").exists()


def test_subprocess_roundtrip(tmp_path, model_pt):
    exe = Path(sys.executable).with_name("tqz")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "tqcodec.cli"]
    p = subprocess.run(cmd + ["encode", str(model_pt)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    p = subprocess.run(cmd + ["decode", str(tmp_path / "model.tqz"), "-o", str(tmp_path / "d.pt")],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert set(torch.load(tmp_path / "d.pt", weights_only=True)) == set(small_state_dict())


# --- standard input and output, as a user runs them -------------------------------------------

def _cmd() -> list[str]:
    return [sys.executable, "-m", "tqcodec.cli"]


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
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
    src = _saved(tmp_path, layered_model(n=3))
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
    assert r.exit_code == 2 and "BAD_OPTION" in r.stderr


def test_real_pipeline_encode_stdout_into_decode_stdin(tmp_path):
    """``tqz encode m -o - | tqz decode - -o out.safetensors`` through an OS pipe, the encoder's
    stderr a terminal (so it draws its progress bar, which must not land in the .tqz on stdout)."""
    import pty

    from safetensors.torch import load_file
    sd = layered_model(n=4)
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


# --- modes and rate targets -------------------------------------------------------------------

def test_cli_encode_mode_and_decode_round_trip(tmp_path):
    from typer.testing import CliRunner

    from tqcodec.cli import app
    g = torch.Generator().manual_seed(2)
    sd = {"w": torch.randn(32, 48, generator=g) * 0.1, "b": torch.randn(32, generator=g)}
    src = tmp_path / "m.pt"
    torch.save(sd, src)
    for mode in CLASSIC_MODES:
        out, dec = tmp_path / f"{mode}.tqz", tmp_path / f"{mode}.pt"
        r = CliRunner().invoke(app, ["encode", str(src), "-o", str(out), "--mode", mode, "--bits", "3"])
        assert r.exit_code == 0, r.output
        r = CliRunner().invoke(app, ["decode", str(out), "-o", str(dec)])
        assert r.exit_code == 0, r.output
        back = torch.load(dec, weights_only=True)
        with tqcodec.open(out) as f:
            assert f.info("w").mode == mode and f.version == (1, 3 if f.manifest_bytes[1] else 2)
            assert torch.equal(back["w"], f.get_tensor("w")) and torch.equal(back["b"], sd["b"])
    r = CliRunner().invoke(app, ["encode", str(src), "-o", str(tmp_path / "x.tqz"), "--mode", "lloyd"])
    assert r.exit_code == 2 and "BAD_OPTION" in r.output


def test_cli_encode_with_stats_and_bits(tmp_path, model_and_stats):
    from typer.testing import CliRunner

    from tqcodec.cli import app
    m, st, _ = model_and_stats
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    torch.save(sd, tmp_path / "m.pt")
    st.save(str(tmp_path / "s.safetensors"))
    r = CliRunner().invoke(app, ["encode", str(tmp_path / "m.pt"), "--stats", str(tmp_path / "s.safetensors"),
                                 "--bits", "3", "-o", str(tmp_path / "m.tqz")])
    assert r.exit_code == 0, r.output
    size = (tmp_path / "m.tqz").stat().st_size
    assert abs(8 * size / param_count(sd) / 3 - 1) <= 0.03
    r = CliRunner().invoke(app, ["encode", str(tmp_path / "m.pt"), "--quality", "30", "--mode", "tq",
                                 "-o", str(tmp_path / "q.tqz")])
    assert r.exit_code == 0, r.output
    assert tqcodec.load(str(tmp_path / "q.tqz")).keys() == sd.keys()


def test_cli_reads_statistics_lazily_and_writes_the_api_file(tmp_path, model_and_stats, monkeypatch):
    """``--stats`` is opened lazily (each tensor's statistics read when the encoder needs them):
    loading every H up front took 3.8 GB of a 604M-parameter Llama's encode. The same file as the
    API gives from the statistics in memory."""
    from tqcodec.model.stats import Stats
    m, st, _ = model_and_stats
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    torch.save(sd, tmp_path / "m.pt")
    st.save(str(tmp_path / "s.safetensors"))
    expected = tqcodec.encode_bytes(sd, stats=Stats.load(str(tmp_path / "s.safetensors")), bits=3.0)

    def loaded_whole(*args, **kwargs):
        raise AssertionError("Stats.load: every H decoded before encoding")

    monkeypatch.setattr(Stats, "load", loaded_whole)
    r = runner.invoke(app, ["encode", str(tmp_path / "m.pt"), "--stats", str(tmp_path / "s.safetensors"),
                            "--bits", "3", "-o", str(tmp_path / "m.tqz")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "m.tqz").read_bytes() == expected


def test_info_plot_draws_the_bit_depth_map(tmp_path):
    from typer.testing import CliRunner

    from tqcodec.cli import app
    from tqcodec.plot import allocation_rows

    g = torch.Generator().manual_seed(5)
    sd = {"a.weight": torch.randn(64, 96, generator=g), "b.weight": torch.randn(32, 64, generator=g) * 0.1,
          "b.bias": torch.randn(32, generator=g)}
    path = tmp_path / "m.tqz"
    tqcodec.save(sd, path, mode="tq", bits=3)
    with tqcodec.open(path) as f:
        rows = allocation_rows(f)
    by_name = {r["name"]: r for r in rows}
    for name in ("a.weight", "b.weight"):
        bands = by_name[name]["bands"]
        assert by_name[name]["mode"] == "tq" and abs(sum(fr for fr, _ in bands) - 1.0) < 1e-9
        assert all(0.0 <= bits <= 20.0 for _, bits in bands)
        assert by_name[name]["row_band"] is False
    png = tmp_path / "alloc.png"
    result = CliRunner().invoke(app, ["info", str(path), "--plot", str(png)])
    assert result.exit_code == 0, result.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- Hugging Face folders ---------------------------------------------------------------------

def test_folder_round_trip_lossless_sharded(hf_src, tmp_path):
    out = tmp_path / "toy.tqz"
    res = runner.invoke(app, ["encode", str(hf_src), "-o", str(out), "--lossless", "-j", "2"])
    assert res.exit_code == 0, res.output
    with tqcodec.open(out) as f:
        assert set(f.metadata["tqz.files"]) == set(HF_FILES)  # not big.bin, not .hidden.json
    dec = tmp_path / "dec"
    res = runner.invoke(app, ["decode", str(out), "-o", str(dec), "--shard-size", "20KB"])
    assert res.exit_code == 0, res.output
    shards = sorted(p.name for p in dec.glob("*.safetensors"))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((dec / hf.INDEX_NAME).read_text())
    src = toy_model()
    got = load_folder(dec)
    assert set(index["weight_map"]) == set(src) == set(got)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in src.values())
    for p in dec.glob("*.safetensors"):  # shards within the size (no tensor here is bigger)
        assert p.stat().st_size < 20_000 + 4096
    for k, t in src.items():
        assert got[k].dtype == t.dtype and torch.equal(got[k], t), k
    for name, data in HF_FILES.items():
        assert (dec / name).read_bytes() == data
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left


def test_cli_tq_scope_tensor_jobs(hf_src, tmp_path):
    a, b = tmp_path / "a.tqz", tmp_path / "b.tqz"
    for out, j in ((a, "1"), (b, "2")):
        res = runner.invoke(app, ["encode", str(hf_src), "-o", str(out), "--mode", "tq", "--bits", "4",
                                  "--tq-scope", "tensor", "-j", j])
        assert res.exit_code == 0, res.output
    assert a.read_bytes() == b.read_bytes()
    res = runner.invoke(app, ["encode", str(hf_src), "-o", str(a), "--tq-scope", "layer", "-f"])
    assert res.exit_code == 2 and "BAD_OPTION" in res.output


# --- URLs -------------------------------------------------------------------------------------

def test_cli_info_and_decode_url(srv, remote_files, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from tqcodec.cli import app
    runner = CliRunner()
    r = runner.invoke(app, ["info", srv.url("/big.tqz"), "--json"])
    assert r.exit_code == 0, r.stderr
    assert srv.requests == 2  # info needs no tensor bytes
    assert '"block11.weight"' in r.stdout
    monkeypatch.chdir(tmp_path)
    r = runner.invoke(app, ["decode", srv.url("/big.tqz")])
    assert r.exit_code == 0, r.stderr
    back = torch.load(tmp_path / "big.decoded.pt", weights_only=True)  # the default name: never the original's
    expect = tqcodec.load(remote_files["/big.tqz"])
    assert set(back) == set(expect) and all(torch.equal(back[k], expect[k]) for k in expect)
    srv.drop_after = 5000
    r = runner.invoke(app, ["decode", srv.url("/big.tqz"), "-o", str(tmp_path / "cut.safetensors")])
    assert r.exit_code == 1 and "TRUNCATED" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "cut.safetensors").exists() and not list(tmp_path.glob(".*.part"))


# --- what a new user meets, through the real tqz entry point (issue 18) ------------------------------

def _run(tmp_path, *args: str, stdin: bytes = None, check: bool = False) -> subprocess.CompletedProcess:
    p = subprocess.run(_cmd() + [str(a) for a in args], cwd=tmp_path, input=stdin, capture_output=True,
                       timeout=300, env=_env())
    assert "Traceback" not in p.stderr.decode(), p.stderr.decode()
    if check:
        assert p.returncode == 0, p.stderr.decode()
    return p


def test_readme_two_liner_works_in_one_folder(tmp_path):
    """tqz encode model.pt; tqz decode model.tqz: the default decode name is never the original's;
    a second decode refuses to overwrite (exit 1), as encode does."""
    torch.save(small_state_dict(), tmp_path / "model.pt")
    _run(tmp_path, "encode", "model.pt", check=True)
    p = _run(tmp_path, "decode", "model.tqz", check=True)
    assert b"model.decoded.pt" in p.stdout
    back = torch.load(tmp_path / "model.decoded.pt", weights_only=True)
    assert set(back) == set(small_state_dict())
    p = _run(tmp_path, "decode", "model.tqz")
    assert p.returncode == 1 and b"OUTPUT_EXISTS" in p.stderr and len(p.stderr.splitlines()) == 1


def test_decode_to_standard_output_writes_safetensors(tmp_path):
    from safetensors.torch import load as load_safetensors
    torch.save(small_state_dict(), tmp_path / "model.pt")
    _run(tmp_path, "encode", "model.pt", check=True)
    p = _run(tmp_path, "decode", "model.tqz", "-o", "-", check=True)
    got, want = load_safetensors(p.stdout), tqcodec.load(tmp_path / "model.tqz")
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    assert not (tmp_path / "-").exists()  # not a folder named "-"
    p = _run(tmp_path, "decode", "-", "-o", "-", stdin=(tmp_path / "model.tqz").read_bytes(), check=True)
    assert load_safetensors(p.stdout).keys() == want.keys()


@pytest.mark.parametrize("args,words", [
    (["encode", "model.pt", "--bits", "0"], "bits must be in"),
    (["encode", "model.pt", "--mode", "foo"], "mode 'foo'"),
    (["encode", "model.pt", "--bits", "3", "--quality", "30"], "bits or quality"),
    (["encode", "model.pt", "--lossless", "--bits", "3"], "lossless"),
    (["encode", "model.pt", "--lossless", "--mode", "tq"], "lossless"),
    (["encode", "model.pt", "--mode", "tq", "--snr", "30"], "snr"),
    (["encode", "model.pt", "--bits", "3", "--granularity", "tensor"], "granularity"),
    (["decode", "-"], "-o/--output"),
    (["encode", "model.pt", "-o", "model.pt"], "overwrite the input"),
])
def test_usage_errors_exit_2_with_one_line(tmp_path, args, words):
    torch.save(small_state_dict(), tmp_path / "model.pt")
    p = _run(tmp_path, *args, stdin=b"")
    lines = p.stderr.decode().strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and "BAD_OPTION" in lines[0] and words in lines[0], lines


class MyThing:
    pass


def test_refused_pickles_say_what_was_found_and_what_to_do(tmp_path):
    code = ("import torch\nclass MyThing: pass\n"
            "torch.save({'w': torch.zeros(2), 'thing': MyThing()}, 'evil.pt')\n")
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True, timeout=120)
    p = _run(tmp_path, "encode", "evil.pt")
    err = p.stderr.decode()
    assert p.returncode == 1 and "BAD_INPUT" in err and "__main__.MyThing" in err and "safetensors" in err
    assert "weights_only set to False" not in err and len(err.strip().splitlines()) == 1
    (tmp_path / "notes.pt").write_text("hello, these are notes\n")
    p = _run(tmp_path, "encode", "notes.pt")
    err = p.stderr.decode()
    assert p.returncode == 1 and "not a PyTorch checkpoint" in err and "weights_only" not in err


def test_verify_reads_standard_input(tmp_path):
    torch.save(small_state_dict(), tmp_path / "model.pt")
    _run(tmp_path, "encode", "model.pt", check=True)
    data = (tmp_path / "model.tqz").read_bytes()
    p = _run(tmp_path, "verify", "-", stdin=data, check=True)
    assert b"<stdin>: OK" in p.stdout and str(len(data)).encode() in p.stdout
    p = _run(tmp_path, "verify", "-", stdin=data[:-5])
    assert p.returncode == 1 and b"<stdin>" in p.stderr and b"TRUNCATED" in p.stderr


def test_carried_files_are_listed_and_never_dropped_silently(tmp_path, hf_src):
    out = tmp_path / "m.tqz"
    tqcodec.api.encode_folder(hf_src, out)
    p = _run(tmp_path, "info", out, check=True)
    assert all(name.encode() in p.stdout for name in HF_FILES) and b"carried files" in p.stdout
    info = json.loads(_run(tmp_path, "info", out, "--json", check=True).stdout)
    assert {f["name"]: f["bytes"] for f in info["files"]} == {k: len(v) for k, v in HF_FILES.items()}
    p = _run(tmp_path, "decode", out, "-o", "x.pt", check=True)  # one file: a note says how to get them
    assert b"-o DIR" in p.stderr and all(name.encode() in p.stderr for name in HF_FILES)
    p = _run(tmp_path, "decode", out, check=True)  # the default for such a file is a folder
    assert all((tmp_path / "m.decoded" / name).read_bytes() == data for name, data in HF_FILES.items())


def test_version_and_help_read_plainly(tmp_path):
    p = _run(tmp_path, "--version", check=True)
    assert p.stdout.decode().startswith(f"tqz (tqcodec) {tqcodec.__version__}") and b"format %d.%d" % tqcodec.FORMAT_VERSION in p.stdout
    for sub in ("encode", "decode", "info", "verify"):
        text = _run(tmp_path, sub, "--help", check=True).stdout.decode()
        assert f"Usage: tqz {sub} [OPTIONS] INPUT" in text.replace("python -m tqcodec.cli", "tqz")
        assert "<bool>" not in text and "{INPUT}" not in text and "{input}" not in text
    readme = (ROOT / "README.md").read_text()
    for option in ("--snr", "--granularity", "--tq-scope", "--threads", "--version"):
        assert option in readme, option


def test_info_plot_never_overwrites_without_force_and_says_where(tmp_path):
    pytest.importorskip("matplotlib")
    torch.save(small_state_dict(), tmp_path / "model.pt")
    _run(tmp_path, "encode", "model.pt", check=True)
    p = _run(tmp_path, "info", "model.tqz", "--plot", "map.png", check=True)
    assert b"map.png" in p.stdout and (tmp_path / "map.png").read_bytes().startswith(b"\x89PNG")
    (tmp_path / "map.png").write_bytes(b"mine")
    p = _run(tmp_path, "info", "model.tqz", "--plot", "map.png")
    assert p.returncode == 1 and b"OUTPUT_EXISTS" in p.stderr and (tmp_path / "map.png").read_bytes() == b"mine"
    _run(tmp_path, "info", "model.tqz", "--plot", "map.png", "--force", check=True)
    assert (tmp_path / "map.png").read_bytes().startswith(b"\x89PNG")
    from tqcodec.plot import allocation_rows, bits_scale
    with tqcodec.open(tmp_path / "model.tqz") as f:
        rows = allocation_rows(f)
    raw_bits = [b for r in rows if r["mode"] == "raw" for _, b in r["bands"]]
    assert max(raw_bits) > 32 and bits_scale(rows) == max(b for r in rows for _, b in r["bands"])  # no cap at 16


def test_summary_says_larger_when_the_file_is_larger_than_fp32(tmp_path):
    torch.save({"b": torch.randn(16)}, tmp_path / "tiny.pt")
    p = _run(tmp_path, "encode", "tiny.pt", check=True)
    assert b"larger than fp32" in p.stdout and b"smaller than fp32" not in p.stdout


@pytest.mark.parametrize("mode", ["ecsq", "kmeans"])
def test_classic_mode_bits_are_the_whole_files_through_the_command(tmp_path, mode):
    g = torch.Generator().manual_seed(6)
    sd = {"a.weight": torch.randn(256, 64, generator=g) * 0.05, "a.bias": torch.randn(256, generator=g) * 0.01}
    torch.save(sd, tmp_path / "m.pt")
    p = _run(tmp_path, "encode", "m.pt", "--mode", mode, "--bits", "3", check=True)
    size = (tmp_path / "m.tqz").stat().st_size
    assert abs(8 * size / sum(t.numel() for t in sd.values()) / 3 - 1) <= 0.03, p.stdout


# --- the smallest file that keeps a metric (--evaluate) ----------------------------------------

EVAL_SCRIPT = """
import math, sys, torch, tqcodec
ref = torch.load(sys.argv[2], weights_only=True)
dec = tqcodec.load(sys.argv[1])
num = sum(float(((dec[k].float() - v.float()) ** 2).sum()) for k, v in ref.items())
den = sum(float((v.float() ** 2).sum()) for v in ref.values())
print("relative error follows")
print(math.sqrt(num / den))
"""


def test_evaluate_writes_the_smallest_file_keeping_the_metric(tmp_path):
    sd = layered_model(n=3)
    model = tmp_path / "model.pt"
    torch.save(sd, model)
    script = tmp_path / "ev.py"
    script.write_text(EVAL_SCRIPT)
    cmd = f"{sys.executable} {script} {{file}} {model}"
    r = tqz("encode", model, "--evaluate", cmd, "--max", "0.04")
    assert r.exit_code == 0, r.output
    assert "trial 1:" in r.output and "passes <= 0.04" in r.output
    with tqcodec.open(tmp_path / "model.tqz") as f:
        log = f.metadata["tqz.search"]
    assert log["trials"][log["chosen"]]["passed"] and log["threshold"] == 0.04
    info = tqz("info", tmp_path / "model.tqz")
    assert "rate search for a metric <= 0.04" in info.output and info.output.count("bits/param, ") == len(log["trials"])
    assert json.loads(tqz("info", tmp_path / "model.tqz", "--json").output)["search"]["chosen"] == log["chosen"]


@pytest.mark.parametrize("command, words", [
    ("exit 3", "exited with status 3"),
    ("echo hello  #", "printed 'hello' as its last line, not a number"),
    ("true", "printed nothing"),
])
def test_evaluate_command_failures_are_one_line_and_write_nothing(tmp_path, model_pt, command, words):
    r = tqz("encode", model_pt, "-o", tmp_path / "m.tqz", "--evaluate", command, "--min", "0.5")
    assert r.exit_code == 1 and words in r.output and "EVALUATE_FAILED" in r.output
    assert "Traceback" not in r.output and not (tmp_path / "m.tqz").exists()


def test_metric_never_reached_exits_1_and_writes_nothing(tmp_path, model_pt):
    r = tqz("encode", model_pt, "-o", tmp_path / "m.tqz", "--evaluate", "echo accuracy: 0.1 #", "--min", "0.5")
    assert r.exit_code == 1 and "METRIC_NOT_MET" in r.output and not (tmp_path / "m.tqz").exists()


@pytest.mark.parametrize("args", [["--min", "0.5"], ["--evaluate", "echo 1"], ["--evaluate", "echo 1", "--min", "1",
                                                                                 "--max", "2"],
                                  ["--evaluate", "echo 1", "--min", "1", "--bits", "3"],
                                  ["--evaluate", "echo 1", "--min", "1", "--lossless"]])
def test_evaluate_option_conflicts_are_usage_errors(model_pt, args):
    r = tqz("encode", model_pt, *args)
    assert r.exit_code == 2 and "BAD_OPTION" in r.output and not model_pt.with_suffix(".tqz").exists()


def test_a_bits_target_the_file_cannot_meet_is_said_in_one_line(tmp_path):
    """A model of a few dozen parameters at --bits 1: the header, manifest and index alone are
    more than its budget, so the file comes out far above it; said, not hidden."""
    model = tmp_path / "tiny.pt"
    torch.manual_seed(0)
    sd = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2)).state_dict()
    torch.save(sd, model)
    r = tqz("encode", model, "--bits", "1")
    assert r.exit_code == 0
    lines = [x for x in r.output.splitlines() if "could not be met" in x]
    assert len(lines) == 1 and lines[0].startswith("tqz: warning: --bits 1 could not be met: the file is ")
    got = 8 * model.with_suffix(".tqz").stat().st_size / param_count(sd)
    assert f"{got:.3f} bits/param" in lines[0]


def test_data_free_warning_is_one_line(tmp_path):
    model = tmp_path / "model.pt"
    torch.save(layered_model(n=3), model)
    r = tqz("encode", model, "--bits", "1")
    assert r.exit_code == 0
    lines = [x for x in r.output.splitlines() if x.startswith("tqz: warning")]
    assert len(lines) == 1 and lines[0].startswith("tqz: warning: data-free tq at --bits 1") and ".py" not in lines[0]
