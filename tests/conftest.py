"""Fixtures shared by several test modules: state dicts, the hostile-pickle marker, a Hugging Face
folder, mode tq's test model with its statistics, an HTTP server with files, Python's own Ctrl-C
handler (the builders they use are in tests/helpers.py)."""
from __future__ import annotations

import signal
from pathlib import Path

import pytest
import torch

import tqcodec
from tests.helpers import MARKER_ENV, Small, remote_model, small_state_dict, toy_model, write_hf
from tests.rangeserver import ServerThread

# tests/test_fuzz.py only re-exports the fuzz harness under the name benchmarks/fuzz.py imports
collect_ignore = ["test_fuzz.py"]


@pytest.fixture
def state_dict() -> dict[str, torch.Tensor]:
    return small_state_dict()


@pytest.fixture
def marker(tmp_path, monkeypatch) -> Path:
    """Where a hostile pickle's code would leave a file (``tests.helpers.RunsCode``), were it run."""
    m = tmp_path / "code-ran"
    monkeypatch.setenv(MARKER_ENV, str(m))
    return m


@pytest.fixture(scope="module")
def hf_src(tmp_path_factory) -> Path:
    """A sharded Hugging Face folder of the toy model (3 shards, an index, carried files)."""
    folder = tmp_path_factory.mktemp("hf") / "toy"
    write_hf(folder, toy_model(), shards=3)
    return folder


@pytest.fixture(scope="module")
def model_and_stats():
    """mode tq's test model (``tests.helpers.Small``), its calibration statistics and inputs."""
    torch.manual_seed(0)
    m = Small()
    m.bn.running_var.copy_(torch.rand(8) * 1e-3)  # tiny variances must survive
    m.eval()
    x = torch.randn(48, 3, 6, 6)
    # without the shifted views calibrate adds to 48 images (tqcodec.model.views): the statistics
    # these tests were written against (with them, --bits 3.0 lands at 2.89 bits/param, outside
    # test_bits_target_whole_file's 3%: the bits loop's steps on a 14,600-parameter model)
    st = tqcodec.calibrate(m, [x[i:i + 16] for i in range(0, 48, 16)], views=False)
    return m, st, x


@pytest.fixture(scope="module")
def remote_files():
    """The files ``srv`` serves: one larger than remote.TAIL_BYTES several times over, one smaller.
    Needs the ``remote`` extra (fsspec, aiohttp)."""
    pytest.importorskip("fsspec")
    pytest.importorskip("aiohttp")
    from tqcodec.io import remote
    big = tqcodec.encode_bytes(remote_model())
    small = tqcodec.encode_bytes({"w": torch.randn(16, 16), "b": torch.zeros(16)})
    assert len(big) > 3 * remote.TAIL_BYTES and len(small) < remote.TAIL_BYTES
    return {"/big.tqz": big, "/small.tqz": small}


@pytest.fixture
def srv(remote_files):
    """A real HTTP/1.1 server on 127.0.0.1 with Range support (tests/rangeserver.py)."""
    with ServerThread(remote_files, max_requests=40) as s:
        yield s


@pytest.fixture
def python_handles_ctrl_c():
    """This process's own SIGINT as Python installs it at a terminal, for the tests that interrupt
    it (restored afterwards). A test run started in the background of a non-interactive shell (a
    CI job) inherits SIGINT ignored, and Python then keeps it ignored."""
    old = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)
