"""Range decoding in worker processes (spec §8.4 and §8.5's re-encode check, run elsewhere).

constriction's decoder holds the GIL for a whole ``decode`` call: two threads each decoding 4M
symbols took 0.28-0.42 s where the same two decodes one after the other took 0.21-0.29 s
(constriction 0.5, 2 CPUs; its encoder likewise). So a chunk is decoded in another process.

The workers are plain interpreters started with ``python -c`` that import numpy, constriction
and this package's coding layer only (not torch, not the caller's ``__main__``, as
multiprocessing's spawn and forkserver would), so one is ready in a fraction of a second; they
are started on first use, kept for the next decode, and each retires after ``IDLE_S`` seconds
without work (or when this process exits: end of file on its pipe).

A :class:`Task` is one range-coded chunk: its words, its table and its symbol count. A worker
runs :func:`~tqcodec.coding.rangecoder.decode_symbols` on it (the §8.5 re-encode check
included) and sends back the symbols (uint8 or uint16) or the ``TqzError`` it raised. Whoever
needs a task's symbols calls :meth:`Task.result`: a task no worker has taken yet is decoded
right there, in the caller's thread (so decoding never waits for a worker to start); a task
whose worker failed in any other way (died, out of memory, a bug) is decoded there too, so
every outcome is exactly the serial decoder's.
"""
from __future__ import annotations

import atexit
import collections
import contextlib
import os
import struct
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Connection
from typing import Optional

import numpy as np

from ..errors import TqzError
from ..processes import current_budget, per_worker, sigint_blocked, worker_env
from .rangecoder import Model, decode_symbols

IDLE_S = 30.0  # a worker with no task for this long exits
DEPTH = 2  # tasks sent to a worker and not yet answered: it never waits for this process's GIL
PIPE_BYTES = 1 << 20  # pipe buffer asked for (Linux), so a worker rarely blocks writing a result

_QUEUED, _SENT, _LOCAL, _DONE, _DROPPED = range(5)


class Task:
    """One range-coded chunk to decode: its ``payload`` (bytes, a multiple of 4), ``freqs`` (the
    checked table), ``count`` symbols."""

    __slots__ = ("payload", "freqs", "count", "state", "symbols", "error", "event", "pool")

    def __init__(self, pool: "Pool", payload: bytes, freqs: np.ndarray, count: int):
        self.pool = pool
        self.payload = payload
        self.freqs = freqs
        self.count = count
        self.state = _QUEUED
        self.symbols: Optional[np.ndarray] = None
        self.error: Optional[TqzError] = None
        self.event = threading.Event()

    @property
    def waiting(self) -> bool:
        """Not decoded yet, nor being decoded by the thread that asked for it."""
        return self.state in (_QUEUED, _SENT)

    def result(self, model: Model) -> np.ndarray:
        """The chunk's symbols (``model``: its table, for a decode in this thread), or the
        ``TqzError`` its decode raised."""
        if self.pool.claim(self) or self.state == _DROPPED:  # no worker has it: decode it here and now
            return self._local(model)
        self.event.wait()
        if self.error is not None:
            raise TqzError(self.error.code, self.error.message)  # a fresh one each time it is asked
        if self.symbols is None:  # the worker failed otherwise: do what a serial decoder does
            return self._local(model)
        return self.symbols

    def _local(self, model: Model) -> np.ndarray:
        return decode_symbols(np.frombuffer(self.payload, dtype="<u4"), model, self.count)


class _Worker:
    """One worker process and the two threads of this process that feed it and read it."""

    def __init__(self, pool: "Pool", env: Optional[dict] = None):
        self.pool = pool
        self.inflight: collections.deque = collections.deque()
        self.slots = threading.Semaphore(DEPTH)
        self.ready = threading.Event()
        self.dead = False
        to_r, to_w = os.pipe()
        from_r, from_w = os.pipe()
        for fd in (to_w, from_w):
            _grow_pipe(fd)
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        code = (f"import sys; sys.path.insert(0, {root!r}); "
                f"from tqcodec.coding.workers import serve; serve({to_r}, {from_w})")
        try:
            with sigint_blocked():  # the worker starts with Ctrl-C blocked: it is the parent's to handle
                self.proc = subprocess.Popen([sys.executable, "-c", code], pass_fds=(to_r, from_w),
                                             stdin=subprocess.DEVNULL, close_fds=True, env=env)
        except BaseException:
            os.close(to_w)
            os.close(from_r)
            raise
        finally:
            os.close(to_r)
            os.close(from_w)
        self.out = Connection(to_w, readable=False)
        self.inp = Connection(from_r, writable=False)
        self.sender = threading.Thread(target=self._send_loop, name="tqcodec-range-send", daemon=True)
        self.receiver = threading.Thread(target=self._receive_loop, name="tqcodec-range-recv", daemon=True)
        self.receiver.start()
        self.sender.start()

    def _send_loop(self) -> None:
        self.ready.wait()
        try:
            while not self.dead:
                self.slots.acquire()
                task = self.pool.take(self)
                if task is None:  # idle, or the pool is closing
                    break
                self.out.send_bytes(struct.pack("<QI", task.count, len(task.freqs)))
                self.out.send_bytes(np.ascontiguousarray(task.freqs, dtype="<u4"))
                self.out.send_bytes(task.payload)
        except (OSError, ValueError):
            pass
        finally:
            self.dead = True
            self.pool.retire(self)
            try:
                self.out.close()  # end of file: the worker exits
            except OSError:
                pass

    def _receive_loop(self) -> None:
        try:
            if self.inp.recv_bytes() != b"R":
                return
            self.ready.set()
            while True:
                head = self.inp.recv_bytes()
                task = self.inflight.popleft()
                kind = head[:1]
                if kind == b"S":
                    task.symbols = recv_array(self.inp, np.uint8 if head[1:] == b"1" else np.dtype("<u2"))
                elif kind == b"E":
                    code, _, message = head[1:].decode("utf-8", "replace").partition("\n")
                    task.error = TqzError(code, message)
                task.state = _DONE  # kind X (any other failure): no symbols, no error -> decoded locally
                task.event.set()
                self.slots.release()
        except (EOFError, OSError, ValueError, IndexError):
            pass
        finally:
            self.dead = True
            if not self.ready.is_set():  # it never started: do not start more (tasks decode here)
                self.pool.broken = True
            self.ready.set()
            self.slots.release()  # wake the sender, which sees ``dead`` and stops
            with self.pool.lock:
                lost, self.inflight = list(self.inflight), collections.deque()
                self.pool.lock.notify_all()
            for task in lost:  # no symbols, no error: whoever waits decodes the chunk itself
                task.state = _DONE
                task.event.set()
            try:
                self.inp.close()
            except OSError:
                pass
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:  # pragma: no cover - it has no more input
                self.proc.kill()


def recv_array(conn: Connection, dtype) -> np.ndarray:
    """One message of ``Connection.send_bytes`` read straight into a new array (one copy, where
    ``recv_bytes`` makes three: the symbols of a 600M-parameter model are 600 MB)."""
    fd = conn.fileno()
    n, = struct.unpack("!i", _read_exact(fd, 4))
    if n == -1:  # a message over 2 GiB: an 8-byte length follows
        n, = struct.unpack("!Q", _read_exact(fd, 8))
    dtype = np.dtype(dtype)
    if n < 0 or n % dtype.itemsize:
        raise ValueError(f"a message of {n} bytes is no array of {dtype}")
    out = np.empty(n // dtype.itemsize, dtype=dtype)
    view = memoryview(out).cast("B")
    pos = 0
    while pos < n:
        got = os.readv(fd, [view[pos:]])
        if got == 0:
            raise EOFError
        pos += got
    return out


def _read_exact(fd: int, n: int) -> bytes:
    parts = []
    while n:
        b = os.read(fd, n)
        if not b:
            raise EOFError
        parts.append(b)
        n -= len(b)
    return b"".join(parts)


def _grow_pipe(fd: int) -> None:
    try:
        import fcntl
        fcntl.fcntl(fd, getattr(fcntl, "F_SETPIPE_SZ", 1031), PIPE_BYTES)
    except (ImportError, OSError):
        pass  # a smaller pipe only costs a little waiting


class Pool:
    """Worker processes taking tasks from one queue in order (oldest first)."""

    def __init__(self) -> None:
        self.lock = threading.Condition()
        self.queue: collections.deque = collections.deque()
        self.workers: list[_Worker] = []
        self.broken = os.name != "posix" or not sys.executable
        self.closing = False
        self.last_used = time.monotonic()

    def ensure(self, n: int) -> None:
        """At least ``n`` live workers (started now if missing; none where processes cannot be
        started: then every task is decoded by the thread asking for it)."""
        with self.lock:
            self.workers = [w for w in self.workers if not w.dead]
            if self.broken or self.closing or len(self.workers) >= n:  # closing: none after kill()
                return
            env = worker_env(per_worker(current_budget(), n))
            while not self.broken and len(self.workers) < n:
                try:
                    self.workers.append(_Worker(self, env))
                except (OSError, ValueError, subprocess.SubprocessError):
                    self.broken = True

    def wait_ready(self, timeout: float = 30.0) -> int:
        """Wait until every worker has started (or failed to); the number ready. (Benchmarks and
        tests: a decode never waits for this, it decodes what no worker has taken.)"""
        deadline = time.monotonic() + timeout
        with self.lock:
            workers = list(self.workers)
        for w in workers:
            w.ready.wait(max(0.0, deadline - time.monotonic()))
        return sum(1 for w in workers if w.ready.is_set() and not w.dead)

    def submit(self, payload: bytes, freqs: np.ndarray, count: int) -> Task:
        task = Task(self, payload, freqs, count)
        with self.lock:
            self.queue.append(task)
            self.last_used = time.monotonic()
            self.lock.notify()
        return task

    @property
    def busy(self) -> bool:
        """Some worker has a task, or a task waits for one."""
        with self.lock:
            return any(w.inflight for w in self.workers) or any(t.state == _QUEUED for t in self.queue)

    def claim(self, task: Task) -> bool:
        """Take ``task`` for the calling thread if no worker has it (True), else False."""
        with self.lock:
            if task.state == _QUEUED:
                task.state = _LOCAL
                return True
            return False

    def cancel(self, tasks) -> None:
        """Drop tasks no worker has taken (their decode is no longer wanted)."""
        with self.lock:
            for t in tasks:
                if t.state == _QUEUED:
                    t.state = _DROPPED

    def take(self, worker: _Worker) -> Optional[Task]:
        """The oldest queued task for ``worker`` (marked sent and put in its in-flight queue), or
        None when the pool closes or has had no task for IDLE_S seconds."""
        with self.lock:
            while True:
                if worker.dead:
                    return None
                while self.queue and self.queue[0].state != _QUEUED:
                    self.queue.popleft()
                if self.queue:
                    task = self.queue.popleft()
                    task.state = _SENT
                    worker.inflight.append(task)
                    self.last_used = time.monotonic()
                    return task
                if self.closing:
                    return None
                idle = time.monotonic() - self.last_used
                if idle >= IDLE_S:
                    return None
                self.lock.wait(IDLE_S - idle)

    def retire(self, worker: _Worker) -> None:
        with self.lock:
            if worker in self.workers:
                self.workers.remove(worker)

    def close(self) -> None:
        with self.lock:
            self.closing = True
            self.lock.notify_all()
            workers = list(self.workers)
        for w in workers:
            w.sender.join(timeout=5)

    def kill(self) -> None:
        """End every worker now, without waiting for its task (Ctrl-C); their tasks are left to
        whoever waits for them (decoded there, as any task of a worker that died)."""
        with self.lock:
            self.closing = True
            self.lock.notify_all()
            workers = list(self.workers)
        for w in workers:
            w.dead = True
            with contextlib.suppress(OSError):
                w.proc.kill()
            w.slots.release()  # a sender waiting for a slot sees ``dead`` and stops
        for w in workers:
            with contextlib.suppress(subprocess.TimeoutExpired):
                w.proc.wait(timeout=5)


_POOL: Optional[Pool] = None
_POOL_LOCK = threading.Lock()


def pool(workers: int) -> Pool:
    """This process's pool, with at least ``workers`` workers."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = Pool()
        p = _POOL
    p.ensure(workers)
    return p


def abort() -> None:
    """Ctrl-C: kill this process's workers now (reaped before this returns) and forget the pool;
    a later decode starts new ones."""
    global _POOL
    with _POOL_LOCK:
        p, _POOL = _POOL, None
    if p is not None:
        p.kill()


def _shutdown() -> None:
    if _POOL is not None:
        try:
            _POOL.close()
        except KeyboardInterrupt:  # Ctrl-C while exiting: do not wait for the workers
            abort()


def _forget_in_child() -> None:  # a fork of this process has none of its threads: start afresh
    global _POOL, _POOL_LOCK
    _POOL = None
    _POOL_LOCK = threading.Lock()


atexit.register(_shutdown)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_in_child)


# --- the worker process ---------------------------------------------------------------------------

def serve(read_fd: int, write_fd: int) -> None:
    """A worker's loop: (count, table, words) in, symbols or an error out, until end of file."""
    import signal
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    inp, out = Connection(read_fd, writable=False), Connection(write_fd, readable=False)
    models: dict[bytes, Model] = {}
    out.send_bytes(b"R")
    while True:
        try:
            head = inp.recv_bytes()
            table = inp.recv_bytes()
            words = recv_array(inp, np.dtype("<u4"))
        except (EOFError, OSError, ValueError):
            return
        count, _ = struct.unpack("<QI", head)
        try:
            model = models.get(table)
            if model is None:
                model = Model(np.frombuffer(table, dtype="<u4"))
                if len(models) >= 8:
                    models.clear()
                models[table] = model
            sym = decode_symbols(words, model, count)
            del words
            answer = [b"S" + (b"1" if len(model.freqs) <= 256 else b"2"),
                      sym.astype(np.uint8 if len(model.freqs) <= 256 else "<u2")]
            del sym
        except TqzError as exc:
            answer = [b"E" + f"{exc.code}\n{exc.message}".encode("utf-8")]
        except Exception:  # noqa: BLE001 - any other failure: the parent decodes this chunk itself
            answer = [b"X"]
        try:
            while answer:
                out.send_bytes(answer.pop(0))
        except OSError:  # the parent has gone (or closed the pipe): no one to answer
            return
