"""Many readers of one file at once (issue 8): threads and processes get identical tensors.

Readers share nothing but the file: each thread may open its own ``TqzFile`` or share one
(``get_tensor`` reads with positional ``pread``, so threads do not move each other's file
position), or stream with ``iter_tensors``; processes do the same. Every reader must produce
the bytes a single ``load`` produces.
"""
from __future__ import annotations

import concurrent.futures as cf
import hashlib
import multiprocessing as mp
import random
import threading
from pathlib import Path

import pytest
import torch

import tqcodec


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


def test_several_decode_workers_give_the_same_bytes_as_one(model_file, reference):
    """``load(jobs=N)`` decodes in N processes; it must not change a single byte."""
    for p in (model_file, model_file.with_name("u.tqz")):
        for w in (1, 2, 4):
            got = {k: digest(v) for k, v in tqcodec.load(p, jobs=w).items()}
            assert got == reference[p.name], w
