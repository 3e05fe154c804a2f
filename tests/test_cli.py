"""The tqz command: through typer's runner and as a subprocess."""
from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import tqcodec
from tqcodec.cli import app
from tests.helpers import small_state_dict

runner = CliRunner()


def tqz(*args: str):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture
def model_pt(tmp_path) -> Path:
    p = tmp_path / "model.pt"
    torch.save(small_state_dict(), p)
    return p


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


def test_existing_output_needs_force(tmp_path, model_pt):
    assert tqz("encode", model_pt).exit_code == 0
    out = tmp_path / "model.tqz"
    before = out.read_bytes()
    r = tqz("encode", model_pt, "--snr", "20")
    assert r.exit_code == 1 and "OUTPUT_EXISTS" in r.output
    assert out.read_bytes() == before
    assert tqz("encode", model_pt, "--snr", "20", "--force").exit_code == 0
    assert out.read_bytes() != before


def test_decode_refuses_to_overwrite_its_input(tmp_path, model_pt):
    assert tqz("encode", model_pt, "-o", tmp_path / "m.tqz").exit_code == 0
    before = (tmp_path / "m.tqz").read_bytes()
    os.link(tmp_path / "m.tqz", tmp_path / "same.pt")
    r = tqz("decode", tmp_path / "m.tqz", "-o", tmp_path / "same.pt", "--force")
    assert r.exit_code == 1 and "overwrite the input" in r.output
    assert (tmp_path / "m.tqz").read_bytes() == before


class Evil:
    def __reduce__(self):
        return (os.system, ("touch " + str(Path(os.environ["EVIL_MARKER"])),))


def test_pickle_with_code_is_refused_and_never_runs(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("EVIL_MARKER", str(marker))
    p = tmp_path / "evil.pt"
    with open(p, "wb") as f:
        pickle.dump({"w": Evil()}, f)
    r = tqz("encode", p)
    assert r.exit_code == 1
    assert "BAD_INPUT" in r.output and str(p) in r.output
    assert not marker.exists()
    assert not (tmp_path / "evil.tqz").exists()


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


def test_bad_option_value_exits_1(tmp_path, model_pt):
    r = tqz("encode", model_pt, "--mode", "zip")
    assert r.exit_code == 1 and "BAD_OPTION" in r.output


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
    assert not (tmp_path / "page.pt").exists()


def test_subprocess_roundtrip(tmp_path, model_pt):
    exe = Path(sys.executable).with_name("tqz")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "tqcodec.cli"]
    p = subprocess.run(cmd + ["encode", str(model_pt)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    p = subprocess.run(cmd + ["decode", str(tmp_path / "model.tqz"), "-o", str(tmp_path / "d.pt")],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert set(torch.load(tmp_path / "d.pt", weights_only=True)) == set(small_state_dict())


def test_info_escapes_names_a_terminal_would_interpret(tmp_path):
    # spec §5.4 allows U+202E (right-to-left override) and C1 controls in names; printed raw they
    # would reorder or hijack the terminal line.
    path = tmp_path / "m.tqz"
    tqcodec.save({"evil\u202eabc\u0085x": torch.ones(3)}, path)
    result = runner.invoke(app, ["info", str(path)])
    assert result.exit_code == 0, result.output
    assert "evil\\u202eabc\\u0085x" in result.output
    assert "\u202e" not in result.output and "\u0085" not in result.output
