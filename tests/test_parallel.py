"""tqcodec.parallel: process pools and streaming for encode and decode (issue 9), and many readers
of one file at once (issue 8).

Readers share nothing but the file: each thread may open its own ``TqzFile`` or share one
(``get_tensor`` reads with positional ``pread``, so threads do not move each other's file
position), or stream with ``iter_tensors``; processes do the same. Every reader must produce
the bytes a single ``load`` produces. Encoding and decoding with ``jobs`` (tensors, tq row blocks,
lazy folders) give the bytes of one process; a streaming encode holds one tensor at a time.
"""
from __future__ import annotations

import concurrent.futures as cf
import hashlib
import multiprocessing as mp
import os
import random
import threading
import weakref
from multiprocessing import resource_sharer
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import tqcodec
from tqcodec import api, parallel, threads
from tqcodec.errors import TqzError
from tqcodec.format.manifest import TensorRecord
from tqcodec.io import hf
from tqcodec.pipeline.encode import tq_blocks
from tests.helpers import small_state_dict


def digest(t: torch.Tensor) -> str:
    flat = t.contiguous().reshape(-1)
    raw = bytes(flat.view(torch.uint8).numpy()) if flat.numel() else b""
    return hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode() + raw).hexdigest()


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    g = torch.Generator().manual_seed(11)
    tensors = {
        "big.raw": torch.randn(1200, 1024, generator=g),                 # 4.7 MiB: two raw chunks
        "emb": (torch.randn(300, 64, generator=g) * 0.3).to(torch.bfloat16),
        "fc.weight": torch.randn(128, 256, generator=g) * 0.05,
        "fc.bias": torch.randn(128, generator=g),
        "ids": torch.arange(1000, dtype=torch.int64),
        "mask": torch.rand(77, generator=g) > 0.5,
        "half": torch.randn(40, 40, generator=g).half(),
    }
    tensors["tied"] = tensors["fc.weight"]
    path = tmp_path_factory.mktemp("conc") / "m.tqz"
    tqcodec.save(tensors, path, mode="auto")
    # the big tensor is lossy-coded in several chunks too
    tqcodec.save({"u": torch.randn(1100, 1024, generator=g)}, path.with_name("u.tqz"), mode="uniform")
    return path


@pytest.fixture(scope="module")
def reference(model_file) -> dict[str, dict[str, str]]:
    return {p.name: {k: digest(v) for k, v in tqcodec.load(p).items()}
            for p in (model_file, model_file.with_name("u.tqz"))}


def read_all(path: str, how: str, seed: int = 0) -> dict[str, str]:
    """One reader: 'load', 'stream' (iter_tensors over an open file object) or 'open' (random order)."""
    if how == "load":
        return {k: digest(v) for k, v in tqcodec.load(path).items()}
    if how == "stream":
        with open(path, "rb") as f:
            return {k: digest(v) for k, v in tqcodec.iter_tensors(f)}
    with tqcodec.open(path) as f:
        names = f.keys()
        random.Random(seed).shuffle(names)
        return {k: digest(f.get_tensor(k)) for k in names}


def test_threads_with_their_own_readers(model_file, reference):
    paths = [model_file, model_file.with_name("u.tqz")]
    jobs = [(p, how, i) for i in range(4) for p in paths for how in ("load", "stream", "open")]
    with cf.ThreadPoolExecutor(8) as ex:
        results = list(ex.map(lambda j: (j[0].name, read_all(str(j[0]), j[1], j[2])), jobs))
    assert len(results) == 24
    for name, got in results:
        assert got == reference[name]


def test_threads_sharing_one_open_file(model_file, reference):
    """One TqzFile, many threads calling get_tensor at once (positional reads, no shared offset)."""
    ref = reference[model_file.name]
    barrier = threading.Barrier(8)
    errors: list = []
    with tqcodec.open(model_file) as f:
        def worker(seed: int) -> dict:
            names = f.keys() * 3
            random.Random(seed).shuffle(names)
            barrier.wait()
            out = {}
            for k in names:
                d = digest(f.get_tensor(k))
                if out.setdefault(k, d) != d:
                    errors.append(k)
            return out
        with cf.ThreadPoolExecutor(8) as ex:
            results = list(ex.map(worker, range(8)))
    assert not errors
    assert all(r == ref for r in results)


def _process_reader(args) -> tuple[str, str, dict]:
    path, how, seed = args
    torch.set_num_threads(1)
    return Path(path).name, how, read_all(path, how, seed)


def test_processes_reading_one_file_at_once(model_file, reference):
    paths = [str(model_file), str(model_file.with_name("u.tqz"))]
    jobs = [(p, how, i) for i, (p, how) in enumerate((p, h) for p in paths for h in ("load", "stream", "open"))]
    with cf.ProcessPoolExecutor(2, mp_context=mp.get_context("forkserver")) as ex:
        results = list(ex.map(_process_reader, jobs))
    assert len(results) == 6
    for name, how, got in results:
        assert got == reference[name], (name, how)


def _what_a_worker_sees() -> dict:
    import signal
    from threadpoolctl import threadpool_info
    return {"torch": torch.get_num_threads(), "blas": sorted({p["num_threads"] for p in threadpool_info()}),
            "env": os.environ.get("OMP_NUM_THREADS"), "sigint": signal.getsignal(signal.SIGINT) is signal.SIG_IGN,
            "pid": os.getpid(), "encoder": threads.current()}


@pytest.mark.parametrize("budget, jobs, share", [(4, 2, 2), (6, 2, 3), (3, 2, 1), (1, 3, 1)])
def test_each_encode_worker_gets_its_share_of_the_thread_budget(budget, jobs, share):
    """``-j N --threads T``: each worker of the pool runs torch and numpy's BLAS/OpenMP pools, and
    the tq encoder, at max(1, T // N) threads (and leaves Ctrl-C to this process)."""
    with threads.budget(budget):
        pool = parallel.make_pool(jobs)
    try:
        seen = [f.result() for f in [pool.submit(_what_a_worker_sees) for _ in range(2 * jobs)]]
    finally:
        pool.shutdown()
    for s in seen:
        assert s["torch"] == share and s["env"] == str(share) and s["sigint"]
        assert s["encoder"] == share  # the tq encoder's threads (tqcodec.modes.tq.pool) in that worker
        assert s["blas"] in ([], [share])  # every BLAS/OpenMP pool the worker has loaded


def test_the_default_budget_is_shared_too():
    """Without a ``budget`` block (the API's ``save(jobs=N)``): every core this process may use."""
    pool = parallel.make_pool(2)
    try:
        assert pool.submit(_what_a_worker_sees).result()["torch"] == threads.per_worker(threads.available_cores(), 2)
    finally:
        pool.shutdown()


def test_several_decode_workers_give_the_same_bytes_as_one(model_file, reference):
    """``load(jobs=N)`` decodes in N processes; it must not change a single byte."""
    for p in (model_file, model_file.with_name("u.tqz")):
        for w in (1, 2, 4):
            got = {k: digest(v) for k, v in tqcodec.load(p, jobs=w).items()}
            assert got == reference[p.name], w


# --- encoding and decoding with jobs: the same bytes as one process ---------------------------

def test_jobs_give_identical_bytes_and_tensors(hf_src, tmp_path):
    sd = small_state_dict()
    sd["tied"] = sd["fc.weight"]  # an alias, decided the same way on every path
    sd["big"] = torch.randn(300, 200, generator=torch.Generator().manual_seed(3))
    base = api.encode_bytes(sd)
    assert api.encode_bytes(sd, jobs=2) == base
    tensors, files = hf.read_folder(hf_src)
    one, two = tmp_path / "1.tqz", tmp_path / "2.tqz"
    api.save(tensors, one, files=files, jobs=1)
    api.save(tensors, two, files=files, jobs=2)
    assert one.read_bytes() == two.read_bytes()
    # the lazy folder gives the same bytes as the same tensors in memory
    assert one.read_bytes() == api.encode_bytes({k: v.load() for k, v in tensors.refs()}, files=files)
    a, b = api.load(base), api.load(_write(tmp_path / "s.tqz", base), jobs=2)
    assert list(a) == list(b)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert b["tied"] is b["fc.weight"]
    c = api.decode_folder(one, tmp_path / "d2", jobs=2, shard_size=30_000)
    d = api.decode_folder(one, tmp_path / "d1", jobs=1, shard_size=30_000)
    assert c == d and all((tmp_path / "d2" / n).read_bytes() == (tmp_path / "d1" / n).read_bytes() for n in c)


def test_tq_tensor_scope_streams_with_identical_bytes(hf_src, tmp_path):
    tensors, _ = hf.read_folder(hf_src)
    a = api.encode_bytes(tensors, mode="tq", bits=4, tq_scope="tensor")
    b = api.encode_bytes(tensors, mode="tq", bits=4, tq_scope="tensor", jobs=2)
    assert a == b
    with tqcodec.open(a) as f:
        assert "tq" in {f.info(n).mode for n in f.keys()}


def test_tensors_reach_encode_workers_as_bytes(monkeypatch):
    """A tensor sent to a worker process is pickled as its bytes: torch's own reduction would hand
    its storage over as a file descriptor through multiprocessing's resource sharer, a listening
    thread in this process that a Ctrl-C could meet mid-accept (a traceback, not "interrupted")."""
    shared = []
    real = resource_sharer.DupFd
    monkeypatch.setattr(resource_sharer, "DupFd", lambda fd: shared.append(fd) or real(fd))
    g = torch.Generator().manual_seed(5)
    sd = {"w": torch.randn(300, 200, generator=g), "half": torch.randn(64, 48, generator=g).bfloat16(),
          "view": torch.randn(40, 80, generator=g)[:, ::2], "scalar": torch.tensor(3.5),
          "ints": torch.arange(10), "empty": torch.zeros(0, 4)}
    for opts in ({"mode": "tq", "bits": 3, "tq_scope": "tensor"}, {}):
        one = api.encode_bytes(sd, **opts)
        assert api.encode_bytes(sd, jobs=2, **opts) == one
        back = api.load(one)
        assert all(back[k].dtype == v.dtype and back[k].shape == v.shape for k, v in sd.items())
    assert shared == []


def _write(p: Path, data: bytes) -> Path:
    p.write_bytes(data)
    return p


def test_tq_row_blocks_of_large_tensors(tmp_path, monkeypatch):
    """Large tensors under tq_scope 'tensor' go in row blocks (parallel tasks) joined into one
    record: same bytes for every jobs, from memory or from a lazy folder, and they decode."""
    import tqcodec.pipeline.encode
    monkeypatch.setattr(tqcodec.pipeline.encode, "TQ_BLOCK_PARAMS", 2000)  # row blocks when encoding
    monkeypatch.setattr(parallel, "TQ_BLOCK_PARAMS", 2000)  # row pieces when decoding to a folder
    g = torch.Generator().manual_seed(5)
    sd = {"w": (torch.randn(90, 64, generator=g) * torch.rand(90, 1, generator=g)).to(torch.bfloat16),
          "v": torch.randn(8, 3, 5, 7, generator=g), "b": torch.randn(90, generator=g)}
    a = api.encode_bytes(sd, mode="tq", bits=4, tq_scope="tensor")
    with tqcodec.open(a) as f:
        assert f.info("w").mode == "tq" and len(f.info("w").params["band_rows"]) >= 3
    assert api.encode_bytes(sd, mode="tq", bits=4, tq_scope="tensor", jobs=2) == a
    folder = tmp_path / "m"
    folder.mkdir()
    save_file(sd, str(folder / "model.safetensors"))
    tensors, _ = hf.read_folder(folder)
    lazy = {k: v.load() for k, v in tensors.refs()}
    assert api.encode_bytes(tensors, mode="tq", bits=4, tq_scope="tensor", jobs=2) == \
        api.encode_bytes(lazy, mode="tq", bits=4, tq_scope="tensor")
    back = api.load(a)
    opts = api.EncodeOptions(mode="tq", bits=4, tq_scope="tensor")
    blocks = [api.load(api.encode_bytes({"w": sd["w"][r0:r1]}, mode="tq", bits=4, tq_scope="tensor"))["w"]
              for r0, r1 in tq_blocks(sd["w"], opts)]
    assert torch.equal(back["w"], torch.cat(blocks))  # the joined record decodes to its blocks
    err = float((back["w"].float() - sd["w"].float()).norm() / sd["w"].float().norm())
    assert err < 0.35  # 4 bits on blocks this tiny: the per-band tables cost much
    # decoding to a folder: the large tq tensor in row pieces, the same values as a whole decode
    tqz = _write(tmp_path / "a.tqz", a)
    with tqcodec.open(tqz) as f:
        ti = f.info("w")
        assert len(parallel.tq_pieces(TensorRecord(ti.name, ti.dtype, ti.shape, ti.mode, ti.params))) >= 2
    for jobs in (1, 2):
        api.decode_folder(tqz, tmp_path / f"d{jobs}", jobs=jobs)
        got = load_file(str(tmp_path / f"d{jobs}" / "model.safetensors"))
        assert all(torch.equal(got[k], back[k]) for k in back)


def test_row_blocks_stay_joinable_where_rows_differ_in_magnitude(monkeypatch):
    """A large tensor with dead rows and columns under tq_scope 'tensor': its row blocks are coded
    without magnitude bands or the in_out layout (which a whole tensor without statistics gets), so
    they join into one record instead of the whole tensor being coded again at once."""
    import tqcodec.pipeline.encode
    monkeypatch.setattr(tqcodec.pipeline.encode, "TQ_BLOCK_PARAMS", 8192)
    g = torch.Generator().manual_seed(6)
    w = torch.randn(512, 64, generator=g) * 0.05
    w[torch.randperm(512, generator=g)[:128]] = 0.0
    w[:, :16] = 0.0
    whole = api.encode_bytes({"w": w}, mode="tq", bits=3, tq_scope="model")
    blocked = api.encode_bytes({"w": w}, mode="tq", bits=3, tq_scope="tensor")
    with tqcodec.open(whole) as f:
        assert "row_band" in f.encoded("w").params  # the whole tensor: rows of like magnitude banded
    with tqcodec.open(blocked) as f:
        params = f.encoded("w").params
    assert set(params) == {"band_rows", "steps", "q_min", "counts"} and len(params["band_rows"]) >= 4
    assert bool((api.load(blocked)["w"][w.abs().sum(1) == 0] == 0).all())


def test_worker_errors_arrive_as_tqz_errors(tmp_path):
    sd = {"ok": torch.randn(40, 40), "bad": torch.randn(4, dtype=torch.complex64)}
    with pytest.raises(TqzError) as e:
        api.save(sd, tmp_path / "x.tqz", jobs=2)
    assert e.value.code == "BAD_INPUT" and "complex" in e.value.message
    assert list(tmp_path.iterdir()) == []  # no partial output


# --- streaming encode: one tensor at a time ---------------------------------------------------

class _CountingRef(hf.TensorRef):
    live = 0
    peak = 0

    def load(self, rows=None):
        t = super().load(rows)
        _CountingRef.live += 1
        _CountingRef.peak = max(_CountingRef.peak, _CountingRef.live)
        weakref.finalize(t, lambda: setattr(_CountingRef, "live", _CountingRef.live - 1))
        return t


def test_lazy_encode_holds_one_tensor_at_a_time(hf_src):
    tensors, _ = hf.read_folder(hf_src)
    counting = hf.LazyTensors((k, _CountingRef(r.path, r.key)) for k, r in tensors.refs())
    data = api.encode_bytes(counting)
    assert _CountingRef.peak == 1 and _CountingRef.live == 0
    assert data == api.encode_bytes(tensors)


def test_whole_model_tq_keeps_lazy_tensors_lazy(tmp_path):
    """Mode tq over the whole model (the default with --bits) reads a folder's tensors where it
    needs them, never all at once, and writes the same bytes as from the tensors in memory."""
    g = torch.Generator().manual_seed(11)
    sd = {f"layers.{i}.weight": (torch.randn(300, 256, generator=g) / (i + 1)).to(torch.bfloat16) for i in range(6)}
    sd.update({f"layers.{i}.bias": torch.randn(300, generator=g) for i in range(6)})
    folder = tmp_path / "m"
    folder.mkdir()
    save_file(sd, str(folder / "model.safetensors"))
    tensors, _ = hf.read_folder(folder)
    counting = hf.LazyTensors((k, _CountingRef(r.path, r.key)) for k, r in tensors.refs())
    _CountingRef.live = _CountingRef.peak = 0
    lazy = api.encode_bytes(counting, mode="tq", bits=4)
    assert _CountingRef.peak <= 3, _CountingRef.peak  # the encoder keeps two matrices, makes a third
    assert lazy == api.encode_bytes({k: r.load() for k, r in tensors.refs()}, mode="tq", bits=4)  # the folder's order
    with tqcodec.open(lazy) as f:
        assert all(f.info(f"layers.{i}.weight").mode == "tq" for i in range(6))
        assert f.info("layers.0.weight").dtype == "bfloat16"
