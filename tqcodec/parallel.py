"""Streaming and parallel encode/decode: one tensor at a time, optionally in a process pool.

Encoding: every tensor goes through the same ``api._encode_one`` whether it runs here or in a
worker, and the container is written by this process in the input order, so the bytes do not
depend on ``jobs``. At most ``2 * jobs`` tensors are in flight; a lazy input (``TensorRef``
values, e.g. from :mod:`tqcodec.hf`) is loaded by the worker itself, so this process never holds
more than the encoded (compressed) results of the tensors in flight.

Decoding: ``iter_decoded(path, jobs)`` decodes tensors in workers that read their spans by random
access (spec §10.2) and yields them in file order.
"""
from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import multiprocessing
import os
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Union

import torch

from .errors import fail

PathLike = Union[str, os.PathLike]


@dataclass(frozen=True)
class TensorRef:
    """A tensor that is not loaded yet: key ``key`` of the safetensors file ``path``.

    Picklable, so a worker process loads it itself. Each load opens and closes the file, so no
    memory map outlives the tensor (resident mapped pages would count towards the peak RSS).
    """

    path: str
    key: str

    def load(self, rows: Optional[tuple[int, int]] = None) -> torch.Tensor:
        """The tensor, or only its rows ``rows[0]:rows[1]`` (read from the file alone)."""
        from safetensors import safe_open
        try:
            with safe_open(self.path, framework="pt") as f:
                t = f.get_tensor(self.key) if rows is None else f.get_slice(self.key)[rows[0]:rows[1]]
        except Exception as exc:  # safetensors raises its own SafetensorError / OSError
            raise fail("BAD_INPUT", f"cannot read tensor {self.key!r} ({exc})", self.path) from None
        return t

    def layout(self) -> tuple[tuple[int, ...], bool]:
        """(shape, is a float dtype) from the file's header, nothing loaded."""
        from safetensors import safe_open
        try:
            with safe_open(self.path, framework="pt") as f:
                sl = f.get_slice(self.key)
                return tuple(sl.get_shape()), sl.get_dtype() in ("F64", "F32", "F16", "BF16")
        except Exception as exc:
            raise fail("BAD_INPUT", f"cannot read tensor {self.key!r} ({exc})", self.path) from None


def check_jobs(jobs: Any) -> int:
    """``jobs``: a positive int, or 0/None meaning every core."""
    if jobs is None or jobs == 0:
        return os.cpu_count() or 1
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 0:
        raise fail("BAD_OPTION", f"jobs must be a positive integer (0: every core), got {jobs!r}")
    return jobs


def _context():
    """forkserver where there is one (no fork of a process holding torch's threads), preloaded
    with tqcodec so a worker starts in milliseconds; spawn elsewhere."""
    methods = multiprocessing.get_all_start_methods()
    if "forkserver" in methods:
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["tqcodec.api", "tqcodec.parallel"])
        return ctx
    return multiprocessing.get_context("spawn")


def _worker_init() -> None:
    torch.set_num_threads(1)  # one process per core: no oversubscription


def make_pool(jobs: int) -> cf.ProcessPoolExecutor:
    return cf.ProcessPoolExecutor(max_workers=jobs, mp_context=_context(), initializer=_worker_init)


def ordered_map(fn: Callable, tasks: Iterable[tuple], jobs: int, window: Optional[int] = None,
                pool: Optional[cf.Executor] = None) -> Iterator[Any]:
    """``fn(*task)`` for each task, results in task order; with jobs > 1 in a process pool with at
    most ``window`` (default 2 * jobs) tasks submitted and not yet consumed."""
    if jobs <= 1 and pool is None:
        for task in tasks:
            yield fn(*task)
        return
    own = pool is None
    pool = pool or make_pool(jobs)
    window = window or 2 * jobs
    pending: deque = deque()
    try:
        it = iter(tasks)
        for task in it:
            pending.append(pool.submit(fn, *task))
            if len(pending) >= window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for fut in pending:
            fut.cancel()
        if own:
            pool.shutdown(wait=True, cancel_futures=True)


# --- encoding -------------------------------------------------------------------------------------

TQ_BLOCK_PARAMS = 1 << 22
"""tq_scope ``tensor`` without statistics: a float tensor of more parameters is encoded in blocks
of output rows of about this many parameters, each on its own to the bits/quality target (its
own bands), and the blocks' bands are joined into the tensor's one tq record. Bounds the working
set by the block, not the tensor, and lets blocks of one tensor run in parallel."""


def tq_blocks(src: Any, opts: Any) -> Optional[list[tuple[int, int]]]:
    """Row blocks ``[(r0, r1), ...]`` for a large float tensor under tq_scope ``tensor``, else None."""
    if not (opts.uses_tq and opts.tq_scope == "tensor" and opts.stats is None):
        return None
    if isinstance(src, TensorRef):
        shape, is_float = src.layout()
    elif isinstance(src, torch.Tensor):
        shape, is_float = tuple(src.shape), src.is_floating_point()
    else:
        return None
    if len(shape) < 2 or not is_float or shape[0] < 2:
        return None
    m = 1
    for d in shape[1:]:
        m *= d
    if shape[0] * m <= TQ_BLOCK_PARAMS or m == 0:
        return None
    rows = max(1, TQ_BLOCK_PARAMS // m)
    return [(r, min(shape[0], r + rows)) for r in range(0, shape[0], rows)]


def merge_tq_blocks(parts: list[Optional[tuple[str, dict, list]]]) -> Optional[tuple[str, dict, list]]:
    """One tq record from row blocks' records (spec §7.5: bands are consecutive rows; layout
    ``out_in``, no transform): band lists joined, band streams in order. None if it cannot."""
    keys = ("band_rows", "steps", "q_min", "counts")
    params: dict[str, list] = {k: [] for k in keys}
    streams: list[list[tuple[int, bytes]]] = [[]]
    for part in parts:
        if part is None or part[0] != "tq" or set(part[1]) != set(keys) or part[2][0]:
            return None
        for k in keys:
            params[k] += part[1][k]
        streams += part[2][1:]
    if len(params["band_rows"]) > 4096:  # spec §7.5.1: at most 4096 bands
        return None
    return "tq", params, streams


def encode_task(name: str, src: Any, opts: Any, rows: Optional[tuple[int, int]] = None) -> tuple:
    """Load (if a TensorRef), check and encode one tensor: (dtype, shape, mode, params, streams).
    With ``rows``: only that row block, in mode tq: (dtype, ("tq", params, streams) or None)."""
    from .api import _encode_one
    from .dtypes import name_of_torch
    from .fileio import check_tensor

    t = (src.load() if rows is None else src.load(rows)) if isinstance(src, TensorRef) else src
    check_tensor(name, t, getattr(src, "path", None))
    if rows is not None:
        return name_of_torch(t.dtype), _encode_tq_tensor(name, t, opts, transforms=False)
    if opts.uses_tq:  # tq_scope "tensor": this tensor on its own to the bits/quality target
        done = _encode_tq_tensor(name, t, opts)
        if done is not None:
            return (name_of_torch(t.dtype), tuple(t.shape)) + done
    mode, params, streams = _encode_one(name, t, opts)
    return name_of_torch(t.dtype), tuple(t.shape), mode, params, streams


def _encode_tq_tensor(name: str, t: torch.Tensor, opts: Any,
                      transforms: bool = True) -> Optional[tuple[str, dict, list]]:
    """Mode tq for one tensor, its bits target measured on the tensor's own bytes (chunks and
    manifest record); None if tq does not take the tensor (the data-free path then does)."""
    from .api import _encode_tq
    from .format.container import CHUNK_HEADER_SIZE
    from .format.manifest import pack_canonical

    def size_of(enc: Mapping[str, tuple[str, dict, list]]) -> int:
        n = 0
        for mode, params, streams in enc.values():
            n += len(pack_canonical({"mode": mode, "name": name, "params": params, "shape": list(t.shape),
                                     "dtype": "float32"}))
            n += sum(CHUNK_HEADER_SIZE + len(p) for chunks in streams for _, p in chunks) + 16  # + index entry
        return n

    enc = _encode_tq([(name, t)], opts, size_of, transforms)
    return enc.get(name)


def _options_for(name: str, opts: Any) -> Any:
    """``opts`` with the calibration statistics of ``name`` only: a task carries (and a worker
    unpickles) one layer's statistics, read then from a lazily opened file (``Stats.open``).
    Done for every N of jobs, so the bytes do not depend on it."""
    if getattr(opts, "stats", None) is None or not hasattr(opts.stats, "subset"):
        return opts
    return dataclasses.replace(opts, stats=opts.stats.subset([name]))


def plan_entries(tensors: Mapping[str, Any]) -> list[tuple[str, Any, Optional[int]]]:
    """(name, tensor or TensorRef, alias target index or None) for each entry, in order.

    Tied in-memory tensors (same storage, offset, shape, strides, dtype) become aliases of the
    first, exactly as ``api.save`` decides; TensorRefs are never tied.
    """
    from .api import _alias_key

    refs = getattr(tensors, "refs", None)
    items = refs() if callable(refs) else list(tensors.items())
    out: list[tuple[str, Any, Optional[int]]] = []
    first_of: dict[tuple, int] = {}
    for i, (name, v) in enumerate(items):
        key = _alias_key(v) if isinstance(v, torch.Tensor) else None
        if key is not None and key in first_of:
            out.append((name, v, first_of[key]))
            continue
        if key is not None:
            first_of[key] = i
        out.append((name, v, None))
    return out


def write_entries(writer: Any, entries: list[tuple[str, Any, Optional[int]]], opts: Any, jobs: int,
                  progress: Optional[Callable[[str, int, int], None]] = None,
                  executor: Optional[cf.Executor] = None) -> list[int]:
    """Encode ``entries`` (``plan_entries``) with ``jobs`` processes, adding each to ``writer``
    in order. Returns the parameter count of each entry."""
    from .format.manifest import TensorRecord
    from .modes import alias

    dtypes: dict[int, tuple[str, tuple[int, ...]]] = {}
    numels: list[int] = []
    remote = jobs > 1 or executor is not None
    blocks = [tq_blocks(src, opts) if target is None else None for _, src, target in entries]

    def tasks() -> Iterator[tuple]:
        for (name, src, target), bl in zip(entries, blocks):
            if target is not None:
                continue
            if bl is None:
                yield name, src, _options_for(name, opts)
                continue
            for r0, r1 in bl:  # an in-memory block sent to a worker: a copy, not the whole storage
                part = src if isinstance(src, TensorRef) else (src[r0:r1].clone() if remote else src[r0:r1])
                yield name, part, opts, (None if not isinstance(src, TensorRef) else (r0, r1))

    results = ordered_map(_block_or_whole, tasks(), jobs, pool=executor)
    for i, ((name, src, target), bl) in enumerate(zip(entries, blocks)):
        if target is not None:
            dtype, shape = dtypes[target]
            writer.add_tensor(TensorRecord(name, dtype, shape, "alias", alias.encode_params(target)), [])
        else:
            if bl is None:
                dtype, shape, mode, params, streams = next(results)
            else:
                parts = [next(results) for _ in bl]
                dtype = parts[0][0]
                shape = tuple(src.layout()[0]) if isinstance(src, TensorRef) else tuple(src.shape)
                merged = merge_tq_blocks([p[1] for p in parts])
                del parts
                if merged is None:  # a block tq did not take: the whole tensor, here
                    dtype, shape, *merged = encode_task(name, src, opts)
                mode, params, streams = merged
            writer.add_tensor(TensorRecord(name, dtype, shape, mode, params), streams)
            del params, streams
            dtypes[i] = (dtype, shape)
        n = 1
        for d in shape:
            n *= d
        numels.append(n)
        if progress:
            progress(name, i + 1, len(entries))
    return numels


def _block_or_whole(name: str, src: Any, opts: Any, *block: Any) -> tuple:
    """A whole tensor (3 args) or a row block (4th arg: rows of a TensorRef, or None for an
    in-memory block already cut): ``encode_task`` with the block marker kept."""
    if not block:
        return encode_task(name, src, opts)
    rows = block[0]
    if rows is None:
        from .dtypes import name_of_torch
        from .fileio import check_tensor
        check_tensor(name, src)
        return name_of_torch(src.dtype), _encode_tq_tensor(name, src, opts)
    return encode_task(name, src, opts, rows)


# --- decoding -------------------------------------------------------------------------------------

_OPEN: dict = {}  # per worker process: path -> TqzFile


def decode_task(path: str, name: str, limits: Any) -> torch.Tensor:
    from . import api
    f = _OPEN.get(path)
    if f is None:
        f = _OPEN[path] = api.open(path, limits=limits)
    return f.get_tensor(name)


def iter_decoded(path: PathLike, jobs: int, limits: Any = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Decode a .tqz file's tensors in ``jobs`` processes, yielding (name, tensor) in file order.

    jobs <= 1: ``api.iter_tensors`` (front to back, every check of spec §10.1). jobs > 1: workers
    decode tensors by random access (spec §10.2: footer, index, manifest, and each span with its
    chunks and CRCs are checked; every span is read). Tied tensors (alias) are shared.
    """
    from . import api
    from .limits import DEFAULT_LIMITS

    limits = limits or DEFAULT_LIMITS
    if jobs <= 1 or not isinstance(path, (str, os.PathLike)):
        yield from api.iter_tensors(path, limits=limits)
        return
    path = os.fspath(path)
    with api.open(path, limits=limits) as f:
        infos = [f.info(n) for n in f.keys()]
        targets = {}
        for i, ti in enumerate(infos):
            if ti.mode == "alias":
                targets[ti.params["of"]] = None
    keep: dict[int, torch.Tensor] = {}
    tasks = ((path, ti.name, limits) for ti in infos if ti.mode != "alias")
    results = ordered_map(decode_task, tasks, jobs)
    for i, ti in enumerate(infos):
        if ti.mode == "alias":
            t = keep[ti.params["of"]]
        else:
            t = next(results)
            if i in targets:
                keep[i] = t
        yield ti.name, t
        del t


# --- decoding in pieces (bounded memory for large tensors) ----------------------------------------

def tq_pieces(record: Any) -> Optional[list[tuple[int, int, int]]]:
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


def decode_piece(path: str, index: int, piece: Optional[tuple[int, int, int]], limits: Any) -> torch.Tensor:
    """Tensor ``index`` of the file, or only the rows of bands ``piece[0]:piece[1]``."""
    from . import api
    from .format.container import TensorChunks
    from .format.manifest import TensorRecord

    f = _OPEN.get(path)
    if f is None:
        f = _OPEN[path] = api.open(path, limits=limits)
    with api._naming(path):
        tc = f._reader.tensor_chunks(index)
        if piece is None:
            return api._decode_chunks(tc)
        b0, b1, _ = piece
        r = tc.record
        p = {k: r.params[k][b0:b1] for k in ("band_rows", "steps", "q_min", "counts")}
        shape = (sum(p["band_rows"]),) + tuple(r.shape[1:])
        sub = TensorRecord(r.name, r.dtype, shape, "tq", p)
        streams = [tc.streams[0]] + tc.streams[1 + b0:1 + b1]
        del tc
        return api._decode_chunks(TensorChunks(index, sub, streams))


def iter_pieces(path: PathLike, jobs: int, limits: Any = None) -> Iterator[tuple[str, torch.Tensor, int]]:
    """(name, tensor or row block, first row) in file order, large tq tensors in row blocks
    (random access; ``jobs`` processes). Memory: the pieces in flight, not whole large tensors."""
    from . import api
    from .limits import DEFAULT_LIMITS

    limits = limits or DEFAULT_LIMITS
    path = os.fspath(path)
    with api.open(path, limits=limits) as f:
        records = list(f._reader.manifest.tensors)
    plan: list[tuple[int, int, Optional[tuple[int, int, int]]]] = []  # (record, decoded index, piece)
    for i, rec in enumerate(records):
        target = rec.params["of"] if rec.mode == "alias" else i
        pieces = tq_pieces(records[target])
        plan += [(i, target, None)] if pieces is None else [(i, target, p) for p in pieces]
    tasks = ((path, t, p, limits) for _, t, p in plan)
    results = ordered_map(decode_piece, tasks, jobs)
    try:
        for i, _, piece in plan:
            t = next(results)
            yield records[i].name, t, 0 if piece is None else piece[2]
            del t
    finally:
        f = _OPEN.pop(path, None)
        if f is not None:
            f.close()
