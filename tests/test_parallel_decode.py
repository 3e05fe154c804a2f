"""Parallel decode (issue 16): range-coded chunks decoded by worker threads
(``tqcodec.coding.workers``) give the same tensors, in the same order, and the same errors as the
serial decoder, for every ``jobs``; spec §8.5's check is made in the workers; each record's
parameters are parsed once."""
from __future__ import annotations

import io
import os
import struct
import threading
import zlib
from pathlib import Path

import pytest
import torch

import tqcodec
from tqcodec import parallel
from tqcodec.coding import workers
from tqcodec.format.chunks import CHUNK_HEADER_SIZE
from tqcodec.format.header import HEADER_SIZE
from tqcodec.format.index import FOOTER_SIZE
from tqcodec.io import sources

ROOT = Path(__file__).resolve().parent.parent
CONFORMANCE = ROOT / "conformance"
JOBS = (2, 3, 4)


@pytest.fixture
def every_chunk_to_workers(monkeypatch):
    """Small test files have small chunks, which the decoder keeps to itself: send them all."""
    monkeypatch.setattr(sources, "MIN_TASK_SYMBOLS", 1)


@pytest.fixture(scope="module")
def warm_pool():
    """This process's pool with 4 workers (the C decoder is built: ``test_the_c_decoder_is_built``)."""
    pool = workers.pool(4)
    assert len(pool.workers) >= 4
    return pool


def bits(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def same(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert bits(a[k]) == bits(b[k]), k


def model(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(400, 32, generator=g)
    return {
        "emb.weight": emb,
        "layer.q.weight": torch.randn(64, 32, generator=g) * 0.1,
        "layer.up.weight": (torch.randn(96, 32, generator=g) * 0.05).to(torch.bfloat16),
        "layer.down.weight": (torch.randn(32, 96, generator=g) * 0.05).half(),
        "layer.bias": torch.randn(32, generator=g),
        "conv.weight": torch.randn(8, 4, 3, 3, generator=g),
        "steps": torch.arange(10),
        "head.weight": emb,  # tied: an alias
    }


MODES = {"tq": dict(mode="tq", bits=4), "uniform": dict(mode="uniform"), "ecsq": dict(mode="ecsq", bits=4),
         "kmeans": dict(mode="kmeans", bits=3), "pq": dict(mode="pq", bits=3), "dither": dict(mode="dither", bits=4),
         "auto": dict(mode="auto", bits=4), "lossless": dict(lossless=True)}


@pytest.fixture(scope="module")
def files() -> dict[str, bytes]:
    return {name: tqcodec.encode_bytes(model(), **opts) for name, opts in MODES.items()}


@pytest.mark.parametrize("mode", sorted(MODES))
def test_same_tensors_and_order_for_every_jobs(files, mode, every_chunk_to_workers, warm_pool, tmp_path):
    data = files[mode]
    ref = tqcodec.load(data, jobs=1)
    path = tmp_path / "m.tqz"
    path.write_bytes(data)
    with tqcodec.open(path) as f:  # random access agrees too
        same(ref, {k: f.get_tensor(k) for k in f.keys()})
    for jobs in JOBS:
        same(ref, tqcodec.load(data, jobs=jobs))
        same(ref, tqcodec.load(path, jobs=jobs))
        same(ref, dict(tqcodec.iter_tensors(path, jobs=jobs)))
        with open(path, "rb") as fh:  # a stream that cannot seek, read as it arrives
            same(ref, dict(tqcodec.iter_tensors(io.BufferedReader(_Pipe(fh)), jobs=jobs)))
    got = tqcodec.load(data, jobs=2)
    assert got["head.weight"] is got["emb.weight"]  # tied tensors stay shared


def tq_variants() -> bytes:
    """``tq`` records the data-free encoder does not write here: a synthesis transform (float32
    and bfloat16 tensors, fewer coefficient rows than columns), layout in_out, a one-level band."""
    import numpy as np
    from tqcodec.format.manifest import TensorRecord
    from tqcodec.format.writer import ContainerWriter
    from tqcodec.modes import tq
    rng = np.random.default_rng(3)
    out = io.BytesIO()
    with ContainerWriter(out) as w:
        def add(name, dtype, shape, enc):
            w.add_tensor(TensorRecord(name, dtype, shape, enc.mode, enc.params), enc.streams)
        n, m, k = 40, 24, 16  # R [n, m], S [m, k], C [k, n]
        s = rng.standard_normal((m, k)).astype(np.float16).astype(np.float64)
        bands = [rng.integers(-6, 7, (6, n)), rng.integers(-3, 4, (10, n))]
        add("transform.f32", "float32", (n, m), tq.write(bands, [-4, -3], transform=s))
        add("transform.bf16", "bfloat16", (n, m), tq.write(bands, [-5, -2], transform=s))
        add("in_out", "float32", (m, n), tq.write([rng.integers(-9, 9, (n, m))], [-6], layout="in_out"))
        add("one_level_band", "float16", (12, 8), tq.write([np.full((4, 8), 3), rng.integers(-2, 3, (8, 8))], [-3, -4]))
        w.finish({})
    return out.getvalue()


def test_tq_transform_and_layouts(every_chunk_to_workers, warm_pool):
    data = tq_variants()
    ref = tqcodec.load(data, jobs=1)
    assert set(ref) == {"transform.f32", "transform.bf16", "in_out", "one_level_band"}
    with tqcodec.open(data) as f:
        same(ref, {k: f.get_tensor(k) for k in f.keys()})
    for jobs in JOBS:
        same(ref, tqcodec.load(data, jobs=jobs))


class _Pipe(io.RawIOBase):
    """A non-seekable stream returning at most 1000 bytes a read."""

    def __init__(self, f):
        self.f = f

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        data = self.f.read(min(len(b), 1000))
        b[:len(data)] = data
        return len(data)


def large_uniform() -> bytes:
    """A tensor of 2.5M elements: three range-coded chunks of up to 2^20 symbols (no test hook)."""
    g = torch.Generator().manual_seed(1)
    return tqcodec.encode_bytes({"big": torch.randn(2500, 1000, generator=g), "small": torch.randn(10, 10)},
                                mode="uniform", granularity="tensor", snr_db=30)


@pytest.fixture(scope="module")
def big() -> bytes:
    return large_uniform()


def spy_tasks(monkeypatch) -> list:
    tasks: list = []
    submit = workers.Pool.submit

    def spy(self, payload, table, count):
        task = submit(self, payload, table, count)
        tasks.append(task)
        return task
    monkeypatch.setattr(workers.Pool, "submit", spy)
    return tasks


def test_large_chunks_are_decoded_by_the_workers(big, warm_pool, monkeypatch):
    tasks = spy_tasks(monkeypatch)
    ref = tqcodec.load(big, jobs=1)
    assert tasks == []  # jobs=1: no worker
    for jobs in JOBS:
        same(ref, tqcodec.load(big, jobs=jobs))
    assert len(tasks) == 3 * len(JOBS)  # the three chunks of "big"; "small" is decoded in place
    assert any(t.symbols is not None for t in tasks)  # symbols that came back from a worker


def payload_regions(data: bytes) -> list[tuple[int, int]]:
    """(header offset, payload length) of every chunk."""
    mlen = struct.unpack_from("<I", data, 20)[0]
    end = struct.unpack_from("<Q", data, len(data) - FOOTER_SIZE)[0]
    out, pos = [], HEADER_SIZE + mlen
    while pos < end:
        plen = struct.unpack_from("<I", data, pos + 20)[0]
        out.append((pos, plen))
        pos += CHUNK_HEADER_SIZE + plen
    return out


def with_payload(data: bytes, header: int, payload: bytes) -> bytes:
    """``data`` with the chunk at ``header`` given ``payload`` (same length) and valid CRCs, so the
    damage reaches the range decoder."""
    b = bytearray(data)
    start = header + CHUNK_HEADER_SIZE
    assert len(payload) == struct.unpack_from("<I", b, header + 20)[0]
    b[start:start + len(payload)] = payload
    struct.pack_into("<I", b, header + 24, zlib.crc32(payload))
    struct.pack_into("<I", b, header + 28, zlib.crc32(bytes(b[header:header + 28])))
    return bytes(b)


def outcome(data, jobs: int):
    """("ok", bits of every tensor) or (code, message) of load; and of iter_tensors, the tensors
    yielded before the error."""
    try:
        return "ok", [(k, bits(v)) for k, v in tqcodec.load(data, jobs=jobs).items()]
    except tqcodec.TqzError as exc:
        seen = []
        try:
            for k, v in tqcodec.iter_tensors(data, jobs=jobs):
                seen.append(k)
        except tqcodec.TqzError as again:
            assert (again.code, again.message) == (exc.code, exc.message)
        return exc.code, exc.message, seen


def test_damaged_payloads_fail_alike(big, warm_pool):
    """Every range-coded payload altered (CRC fixed, so only the range decoder can tell): the
    same code and message, after the same tensors, for every jobs."""
    regions = payload_regions(big)
    cases = []
    for header, plen in regions:
        start = header + CHUNK_HEADER_SIZE
        payload = big[start:start + plen]
        words = bytearray(payload)
        words[-4:] = struct.pack("<I", (struct.unpack("<I", payload[-4:])[0] + 1) & 0xFFFFFFFF)  # seal + 1
        cases.append(with_payload(big, header, bytes(words)))
        mid = bytearray(payload)
        mid[len(mid) // 2] ^= 0x5A
        cases.append(with_payload(big, header, bytes(mid)))
    cases.append(big[:regions[1][0] + 100])  # cut inside the second chunk
    cases.append(big[:-1])
    codes = set()
    for data in cases:
        ref = outcome(data, 1)
        codes.add(ref[0])
        for jobs in JOBS:
            assert outcome(data, jobs) == ref
    assert "BAD_PAYLOAD" in codes and "TRUNCATED" in codes


def test_the_reencode_check_is_made_in_the_workers(big, warm_pool, monkeypatch):
    """Spec §8.5: a payload that decodes (its seal word + 1: the same symbols) but is not the
    canonical coding of its symbols is BAD_PAYLOAD, found by the worker that decoded it."""
    header, plen = payload_regions(big)[1]  # "big"'s second chunk
    start = header + CHUNK_HEADER_SIZE
    payload = bytearray(big[start:start + plen])
    payload[-4:] = struct.pack("<I", struct.unpack("<I", payload[-4:])[0] + 1)
    bad = with_payload(big, header, bytes(payload))
    with pytest.raises(tqcodec.TqzError) as serial:
        tqcodec.load(bad, jobs=1)
    assert serial.value.code == "BAD_PAYLOAD" and "is not the coding of" in serial.value.message
    tasks = spy_tasks(monkeypatch)
    for jobs in JOBS:
        with pytest.raises(tqcodec.TqzError) as par:
            tqcodec.load(bad, jobs=jobs)
        assert (par.value.code, par.value.message) == (serial.value.code, serial.value.message)
    from_workers = [t for t in tasks if t.error is not None]
    assert from_workers and all(t.error.code == "BAD_PAYLOAD" for t in from_workers)


def vectors(group: str) -> list[Path]:
    return sorted(p for p in (CONFORMANCE / group).glob("*/in.tqz"))


@pytest.mark.parametrize("group", ["invalid", "valid"])
def test_conformance_vectors_alike_for_every_jobs(group, every_chunk_to_workers, warm_pool):
    """Every conformance vector, every range-coded chunk sent to a worker: the same outcome
    (tensors, or code and message) as the serial decoder, and the expected code."""
    import json
    paths = vectors(group)
    assert len(paths) > 50
    for p in paths:
        ref = outcome(p, 1)
        want = json.loads((p.parent / "vector.json").read_text()).get("expect_error")
        assert ref[0] == (want or "ok"), p.parent.name
        assert outcome(p, 2) == ref, p.parent.name  # jobs 3 and 4: test_same_tensors_and_order_for_every_jobs


def test_each_record_is_parsed_once(files, monkeypatch, every_chunk_to_workers):
    from tqcodec import modes
    calls: dict[str, int] = {}
    for name, module in modes.MODES.items():
        parse = module.parse

        def counting(record, _parse=parse, _name=name):
            calls[_name] = calls.get(_name, 0) + 1
            return _parse(record)
        monkeypatch.setattr(module, "parse", counting)
    data = files["auto"]
    with tqcodec.open(data) as f:
        want = {}
        for k in f.keys():
            want[f.info(k).mode] = want.get(f.info(k).mode, 0) + 1
    calls.clear()
    for jobs in (1, 2):
        calls.clear()
        tqcodec.load(data, jobs=jobs)
        assert calls == want
        calls.clear()
        list(tqcodec.iter_tensors(data, jobs=jobs))
        assert calls == want


def test_a_failing_worker_changes_nothing(big, monkeypatch):
    """A worker whose decode fails other than with a TqzError (out of memory, a bug): the chunk
    is decoded by the thread that asks for it; the tensors are the same."""
    fresh = workers.Pool()
    monkeypatch.setattr(workers, "_POOL", fresh)
    failed = []

    def failing(*args, **kwargs):
        failed.append(threading.current_thread().name)
        raise MemoryError
    try:
        ref = tqcodec.load(big, jobs=1)
        monkeypatch.setattr(workers, "Model", failing)  # the workers' table (the asker's is its own)
        same(ref, tqcodec.load(big, jobs=2))
        same(ref, dict(tqcodec.iter_tensors(big, jobs=2)))
    finally:
        fresh.stop()
    assert failed and set(failed) == {"tqcodec-range-decode"}


def test_without_the_c_decoder_no_worker_is_started(big, monkeypatch):
    """constriction's decoder holds the GIL: where the C decoder was not built, every chunk is
    decoded by the decoding thread (by constriction, with §8.5's re-encode), the same tensors."""
    from tqcodec.coding import rangecoder
    ref = tqcodec.load(big, jobs=1)
    monkeypatch.setattr(rangecoder, "native", None)
    monkeypatch.setattr(workers, "native", None)
    fresh = workers.Pool()
    monkeypatch.setattr(workers, "_POOL", fresh)
    same(ref, tqcodec.load(big, jobs=2))
    assert fresh.broken and not fresh.workers


def test_no_thread_can_start(big, monkeypatch):
    fresh = workers.Pool()
    monkeypatch.setattr(workers, "_POOL", fresh)

    start = threading.Thread.start

    def refuse(self):  # a worker's thread (the process's thread limit reached)
        if self.name == "tqcodec-range-decode":
            raise RuntimeError("can't start new thread")
        start(self)
    ref = tqcodec.load(big, jobs=1)
    monkeypatch.setattr(threading.Thread, "start", refuse)
    same(ref, tqcodec.load(big, jobs=2))
    assert fresh.broken and not fresh.workers


def test_stopping_early_stops_the_read_ahead(big, warm_pool):
    before = {t.ident for t in threading.enumerate()}
    it = tqcodec.iter_tensors(big, jobs=2)
    name, _ = next(it)
    assert name == "big"
    it.close()
    left = [t for t in threading.enumerate() if t.name == "tqcodec-read-ahead" and t.ident not in before]
    assert left == []
    with warm_pool.lock:
        assert all(t.state != 0 for t in warm_pool.queue)  # nothing left for the workers to do
    same(tqcodec.load(big, jobs=1), tqcodec.load(big, jobs=2))  # and the pool still works


def test_default_jobs_are_the_cpus_this_process_may_use():
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert parallel.check_jobs(None) == n == parallel.check_jobs(0)
    assert parallel.check_jobs(3) == 3
    with pytest.raises(tqcodec.TqzError):
        parallel.check_jobs(-1)


def test_cli_decode_jobs(big, tmp_path):
    from typer.testing import CliRunner
    from tqcodec.cli import app
    src = tmp_path / "m.tqz"
    src.write_bytes(big)
    outs = {}
    for jobs in ("1", "2", "0", None):  # None: the default, every CPU this process may use
        out = tmp_path / f"out{jobs}.safetensors"
        res = CliRunner().invoke(app, ["decode", str(src), "-o", str(out)] + (["-j", jobs] if jobs else []))
        assert res.exit_code == 0, res.output
        outs[jobs] = out.read_bytes()
    assert outs["1"] == outs["2"] == outs["0"] == outs[None]


def test_idle_workers_end_and_a_stopped_pool_takes_nothing(big, monkeypatch):
    """Workers end after IDLE_S without work; a stopped pool leaves its tasks to their askers."""
    fresh = workers.Pool()
    monkeypatch.setattr(workers, "IDLE_S", 0.2)
    monkeypatch.setattr(workers, "_POOL", fresh)
    ref = tqcodec.load(big, jobs=1)
    same(ref, tqcodec.load(big, jobs=2))
    threads = [w.thread for w in fresh.workers]
    assert len(threads) == 2
    for t in threads:
        t.join(10)
    assert not any(t.is_alive() for t in threads) and fresh.workers == []
    fresh.ensure(2)
    fresh.stop()
    assert fresh.workers == []
    task = fresh.submit(b"\0" * 4, None, 1)
    assert task.state == workers._QUEUED and fresh.claim(task)  # no worker took it
