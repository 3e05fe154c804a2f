"""Streaming and parallel encode/decode: one tensor at a time, optionally in a process pool.

Encoding: every tensor goes through the same ``tqcodec.pipeline.encode.encode_entry`` whether
it runs here or in a worker, and the container is written by this process in the input order,
so the bytes do not depend on ``jobs``. At most ``2 * jobs`` tensors are in flight; a lazy input
(``TensorRef`` values, e.g. from :mod:`tqcodec.io.hf`) is loaded by the worker itself, so this
process never holds more than the encoded (compressed) results of the tensors in flight.

Decoding: ``iter_decoded(source, jobs)`` reads the file front to back and has its range-coded
chunks decoded by worker threads (``tqcodec.coding.workers``: the C range decoder releases the
GIL); ``iter_pieces`` decodes large tq tensors in row blocks in a process pool
(Hugging Face folders, bounded memory).
"""
from __future__ import annotations

import concurrent.futures as cf
import contextlib
import math
import multiprocessing
import os
import signal
from collections import deque
from typing import Any, Callable, Iterable, Iterator, Optional, Union

import torch

from .errors import fail
from .format.manifest import TensorRecord
from .format.reader import TensorChunks
from .format.writer import ContainerWriter
from .io.sources import RandomAccess, Source, iter_tensors, naming
from .limits import DEFAULT_LIMITS, Limits
from .modes import alias
from .pipeline.decode import decode_tensor
from .pipeline.encode import EncodeOptions, TQ_BLOCK_PARAMS, encode_block, encode_entry, merge_tq_blocks, tq_blocks
from .pipeline.tensors import is_lazy
from .processes import current_budget, deferred, per_worker, sigint_blocked
from .threads import limit_this_process

PathLike = Union[str, os.PathLike]


def available_cores() -> int:
    """The CPUs this process may run on (its affinity mask, where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def check_jobs(jobs: Any) -> int:
    """``jobs``: a positive int, or 0/None meaning every core this process may use."""
    if jobs is None or jobs == 0:
        return available_cores()
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 0:
        raise fail("BAD_OPTION", f"jobs must be a positive integer (0: every core), got {jobs!r}")
    return jobs


def _context():
    """forkserver where there is one (no fork of a process holding torch's threads), preloaded
    with tqcodec so a worker starts in milliseconds; spawn elsewhere."""
    methods = multiprocessing.get_all_start_methods()
    if "forkserver" in methods:
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["tqcodec.parallel"])
        from multiprocessing import forkserver, resource_tracker
        # started with SIGINT blocked (as Python starts its resource tracker): a Ctrl-C at the
        # terminal reaches the whole process group, and the server and the workers it forks
        # (which inherit the mask) leave it to this process, even while they start up. (The
        # tracker first: starting it unblocks SIGINT in this thread.)
        resource_tracker.ensure_running()
        with sigint_blocked():
            forkserver.ensure_running()
        return ctx
    return multiprocessing.get_context("spawn")


def _worker_init(threads: int = 1) -> None:
    """A pool worker: Ctrl-C is the parent's to handle (it ends the pool), and the worker's
    threads are its share of the run's budget (``tqcodec.threads``)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    limit_this_process(threads)


def make_pool(jobs: int, threads: Optional[int] = None) -> cf.ProcessPoolExecutor:
    """``jobs`` worker processes, each with ``threads // jobs`` threads (``threads``: the budget
    in force, ``tqcodec.threads.budget``, by default)."""
    share = per_worker(current_budget() if threads is None else threads, jobs)
    return cf.ProcessPoolExecutor(max_workers=jobs, mp_context=_context(), initializer=_worker_init,
                                  initargs=(share,))


def terminate_pool(pool: cf.ProcessPoolExecutor) -> None:
    """End a pool now, its running tasks with it (Ctrl-C, or results no longer wanted): its
    workers are terminated and reaped before this returns."""
    procs = list((getattr(pool, "_processes", None) or {}).values())
    for p in procs:
        with contextlib.suppress(Exception):
            p.terminate()
    pool.shutdown(wait=True, cancel_futures=True)
    for p in procs:
        with contextlib.suppress(Exception):
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)


def ordered_map(fn: Callable, tasks: Iterable[tuple], jobs: int, window: Optional[int] = None,
                pool: Optional[cf.Executor] = None) -> Iterator[Any]:
    """``fn(*task)`` for each task, results in task order; with jobs > 1 in a process pool with at
    most ``window`` (default 2 * jobs) tasks submitted and not yet consumed. A task's tensors
    reach the pool as their bytes (:class:`_Plain`)."""
    if jobs <= 1 and pool is None:
        for task in tasks:
            yield fn(*task)
        return
    own = pool is None
    with deferred():  # a pool is made whole or not at all
        pool = pool or make_pool(jobs)
    window = window or 2 * jobs
    pending: deque = deque()
    finished = False
    try:
        it = iter(tasks)
        for task in it:
            with deferred():  # a submit may start a worker: never cut that in the middle
                pending.append(pool.submit(_with_tensors, fn, *(_Plain(a) if isinstance(a, torch.Tensor) else a
                                                                 for a in task)))
            if len(pending) >= window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
        finished = True
    finally:
        for fut in pending:
            fut.cancel()
        if own and finished:
            pool.shutdown(wait=True)
        elif own:  # an error, Ctrl-C, or the consumer gone: the tasks still running are not wanted
            terminate_pool(pool)


# --- encoding -------------------------------------------------------------------------------------

def write_entries(writer: ContainerWriter, entries: list[tuple[str, Any, Optional[int]]], opts: EncodeOptions,
                  jobs: int, progress: Optional[Callable[[str, int, int], None]] = None,
                  executor: Optional[cf.Executor] = None) -> list[int]:
    """Encode ``entries`` (``tqcodec.pipeline.tensors.plan_entries``: name, tensor or lazy
    tensor, alias target) with ``jobs`` processes, adding each to ``writer`` in order. Returns
    the parameter count of each entry."""
    dtypes: dict[int, tuple[str, tuple[int, ...]]] = {}
    numels: list[int] = []
    blocks = [tq_blocks(src, opts) if target is None else None for _, src, target in entries]

    def tasks() -> Iterator[tuple]:
        for (name, src, target), bl in zip(entries, blocks):
            if target is not None:
                continue
            if bl is None:
                yield encode_entry, name, src, opts.for_tensor(name)
                continue
            for r0, r1 in bl:
                if is_lazy(src):  # the worker reads its rows itself
                    yield encode_entry, name, src, opts, (r0, r1)
                else:  # an in-memory block (sent to a worker: its bytes, not the whole storage)
                    yield encode_block, name, src[r0:r1], opts

    results = ordered_map(_call, tasks(), jobs, pool=executor)
    for i, ((name, src, target), bl) in enumerate(zip(entries, blocks)):
        if target is not None:
            dtype, shape = dtypes[target]
            writer.add_tensor(TensorRecord(name, dtype, shape, "alias", alias.write(target).params), [])
        else:
            if bl is None:
                dtype, shape, encoded = next(results)
            else:
                parts = [next(results) for _ in bl]
                dtype = parts[0][0]
                shape = tuple(src.layout()[0]) if is_lazy(src) else tuple(src.shape)
                encoded = merge_tq_blocks([p[1] for p in parts])
                del parts
                if encoded is None:  # a block tq did not take: the whole tensor, here
                    dtype, shape, encoded = encode_entry(name, src, opts)
            writer.add_tensor(TensorRecord(name, dtype, shape, encoded.mode, encoded.params), encoded.streams)
            del encoded
            dtypes[i] = (dtype, shape)
        numels.append(math.prod(shape))
        if progress:
            progress(f"encoding: {name}", i + 1, len(entries))
    return numels


def _call(fn: Callable, *args: Any) -> Any:
    """A task of the pool: ``fn(*args)`` (``fn`` a module-level function, so it pickles)."""
    return fn(*args)


def _with_tensors(fn: Callable, *args: Any) -> Any:
    """In a pool's worker: ``fn(*args)``, each :class:`_Plain` argument as its tensor."""
    return fn(*(a.tensor() if isinstance(a, _Plain) else a for a in args))


class _Plain:
    """A tensor sent to a worker process as its bytes (:func:`ordered_map`). Pickled for a process pool, a torch tensor
    takes torch's own reduction: its storage is moved to shared memory and a file descriptor
    handed over through multiprocessing's resource sharer, a listening thread started in this
    process, which a Ctrl-C could meet in the middle of an accept (a traceback from that thread
    instead of "tqz: interrupted"). Bytes pickle plainly; tensors that are not plain strided ones
    (sparse, quantized: the worker's checks refuse them) are sent as they are."""

    def __init__(self, t: Any) -> None:
        plain = isinstance(t, torch.Tensor) and t.layout == torch.strided and not t.is_quantized
        self.dtype, self.shape = (t.dtype, tuple(t.shape)) if plain else (None, None)
        self.data = t.detach().contiguous().reshape(-1).view(torch.uint8).numpy() if plain else t

    def tensor(self) -> Any:
        if self.dtype is None:
            return self.data
        return torch.from_numpy(self.data).view(self.dtype).reshape(self.shape)


# --- decoding -------------------------------------------------------------------------------------

_OPEN: dict = {}  # per worker process: path -> RandomAccess


def _opened(path: str, limits: Limits) -> RandomAccess:
    f = _OPEN.get(path)
    if f is None:
        f = _OPEN[path] = RandomAccess(path, limits)
    return f


def iter_decoded(source: Source, jobs: int, limits: Limits = DEFAULT_LIMITS) -> Iterator[tuple[str, torch.Tensor]]:
    """Decode a .tqz file's tensors front to back (spec §10.1, every check), yielding (name,
    tensor) in file order; with ``jobs`` > 1 the range-coded chunks are decoded by ``jobs``
    worker threads as they are read (:func:`tqcodec.io.sources.iter_tensors`), from any
    source (path, bytes, stream, URL). The tensors are the same for every ``jobs``; tied tensors
    (alias) are shared."""
    yield from iter_tensors(source, limits, jobs)


# --- decoding in pieces (bounded memory for large tensors) ----------------------------------------

def tq_pieces(record: TensorRecord) -> Optional[list[tuple[int, int, int]]]:
    """For a large ``tq`` tensor (layout out_in, no transform, several bands): groups of whole
    bands of about TQ_BLOCK_PARAMS parameters, as (first band, end band, first row); else None."""
    if record.mode != "tq" or set(record.params) - {"band_rows", "steps", "q_min", "counts"}:
        return None
    rows = record.params.get("band_rows")
    if not isinstance(rows, list) or len(rows) < 2 or not record.shape or record.numel <= TQ_BLOCK_PARAMS:
        return None
    if not all(type(r) is int and r >= 1 for r in rows) or sum(rows) != record.shape[0]:
        return None  # let the whole-tensor decode report what is wrong
    m = record.numel // record.shape[0]
    pieces, b0, r0, row, size = [], 0, 0, 0, 0
    for b, r in enumerate(rows):
        if b > b0 and size + r * m > TQ_BLOCK_PARAMS:
            pieces.append((b0, b, r0))
            b0, r0, size = b, row, 0
        size += r * m
        row += r
    pieces.append((b0, len(rows), r0))
    return pieces if len(pieces) > 1 else None


def decode_piece(path: str, index: int, piece: Optional[tuple[int, int, int]], limits: Limits) -> torch.Tensor:
    """Worker: tensor ``index`` of the file, or only the rows of bands ``piece[0]:piece[1]``."""
    f = _opened(path, limits)
    if piece is None:
        return f.tensor(index)
    with naming(path):
        tc = f.reader.tensor_chunks(index)
        b0, b1, _ = piece
        r = tc.record
        p = {k: r.params[k][b0:b1] for k in ("band_rows", "steps", "q_min", "counts")}
        shape = (sum(p["band_rows"]),) + tuple(r.shape[1:])
        sub = TensorRecord(r.name, r.dtype, shape, "tq", p)
        streams = [tc.streams[0]] + tc.streams[1 + b0:1 + b1]
        del tc
        return decode_tensor(TensorChunks(index, sub, streams))


def iter_pieces(path: PathLike, jobs: int, limits: Limits = DEFAULT_LIMITS) -> Iterator[tuple[str, torch.Tensor, int]]:
    """(name, tensor or row block, first row) in file order, large tq tensors in row blocks
    (random access; ``jobs`` processes). Memory: the pieces in flight, not whole large tensors."""
    path = os.fspath(path)
    f = RandomAccess(path, limits)
    try:
        records = list(f.records)
        plan: list[tuple[int, int, Optional[tuple[int, int, int]]]] = []  # (record, decoded index, piece)
        for i, rec in enumerate(records):
            target = f.target(i)
            pieces = tq_pieces(records[target])
            plan += [(i, target, None)] if pieces is None else [(i, target, p) for p in pieces]
    finally:
        f.close()
    tasks = ((decode_piece, path, t, p, limits) for _, t, p in plan)
    results = ordered_map(_call, tasks, jobs)
    try:
        for i, _, piece in plan:
            t = next(results)
            yield records[i].name, t, 0 if piece is None else piece[2]
            del t
    finally:
        f = _OPEN.pop(path, None)
        if f is not None:
            f.close()
