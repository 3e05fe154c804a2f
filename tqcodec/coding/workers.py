"""Range decoding on worker threads (spec §8.4 and §8.5's check, run beside the decoding thread).

The C decoder (:mod:`tqcodec.coding.native`) releases the GIL for the whole of a chunk, so a
chunk decodes on another thread of this process while the decoding thread dequantizes the
tensor before it: no process to start, nothing copied through a pipe. Where the extension was not
built, decoding falls back to constriction, which holds the GIL for a whole ``decode`` call:
threads would then take turns, so none is started and every chunk is decoded by the thread that
needs it.

A :class:`Task` is one range-coded chunk: its words, its table and its symbol count. A worker
runs :func:`~tqcodec.coding.rangecoder.decode_symbols` on it (the §8.5 check included) and keeps
the symbols (the narrowest unsigned type) or the ``TqzError`` it raised. Whoever needs a task's
symbols calls :meth:`Task.result`: a task no worker has taken yet is decoded right there, in the
caller's thread (so decoding never waits on a busy worker); a task whose worker failed in any
other way (out of memory, a bug) is decoded there too, so every outcome is exactly the serial
decoder's. Workers start on first use, are kept for the next decode, and each ends after
``IDLE_S`` seconds without work.
"""
from __future__ import annotations

import collections
import os
import threading
import time
from typing import Optional

import numpy as np

from ..errors import TqzError
from .rangecoder import Model, decode_symbols, native

IDLE_S = 30.0  # a worker with no task for this long ends
JOIN_S = 5.0  # how long stop() waits for a worker to finish its chunk (one chunk is milliseconds)

_QUEUED, _TAKEN, _LOCAL, _DONE, _DROPPED = range(5)


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
        return self.state in (_QUEUED, _TAKEN)

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
    """One worker thread, and the task it is decoding."""

    def __init__(self, pool: "Pool"):
        self.pool = pool
        self.current: Optional[Task] = None
        self.thread = threading.Thread(target=self._run, name="tqcodec-range-decode", daemon=True)

    def _run(self) -> None:
        models: dict[int, tuple[np.ndarray, Model]] = {}  # id(table) -> (table, its Model); the table
        try:                                              # is held, so its id is not reused meanwhile
            while True:
                task = self.pool.take(self)
                if task is None:  # idle, or the pool stops
                    return
                try:
                    known = models.get(id(task.freqs))
                    if known is None:
                        if len(models) >= 8:
                            models.clear()
                        known = models[id(task.freqs)] = (task.freqs, Model(task.freqs))
                    task.symbols = decode_symbols(np.frombuffer(task.payload, dtype="<u4"), known[1],
                                                  task.count, narrow=True)
                except TqzError as exc:
                    task.error = exc
                except Exception:  # noqa: BLE001 - any other failure: the asker decodes this chunk itself
                    task.symbols = None
                finally:
                    self.pool.finish(self, task)
        finally:
            self.pool.retire(self)


class Pool:
    """Worker threads taking tasks from one queue in order (oldest first)."""

    def __init__(self) -> None:
        self.lock = threading.Condition()
        self.queue: collections.deque = collections.deque()
        self.workers: list[_Worker] = []
        self.broken = native is None  # constriction holds the GIL: the asking thread decodes all
        self.closing = False
        self.last_used = time.monotonic()

    def ensure(self, n: int) -> None:
        """At least ``n`` workers (started now if missing; none without the C decoder, or where
        no thread can be started: then every task is decoded by the thread asking for it)."""
        with self.lock:
            if self.broken or self.closing or len(self.workers) >= n:  # closing: none after stop()
                return
            while len(self.workers) < n:
                worker = _Worker(self)
                try:
                    worker.thread.start()
                except RuntimeError:  # "can't start new thread"
                    self.broken = True
                    return
                self.workers.append(worker)

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
            return any(w.current for w in self.workers) or any(t.state == _QUEUED for t in self.queue)

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
        """The oldest queued task for ``worker`` (marked taken), or None when the pool stops or
        has had no task for IDLE_S seconds."""
        with self.lock:
            while True:
                while self.queue and self.queue[0].state != _QUEUED:
                    self.queue.popleft()
                if self.closing:
                    return None
                if self.queue:
                    task = self.queue.popleft()
                    task.state = _TAKEN
                    worker.current = task
                    self.last_used = time.monotonic()
                    return task
                idle = time.monotonic() - self.last_used
                if idle >= IDLE_S:
                    return None
                self.lock.wait(IDLE_S - idle)

    def finish(self, worker: _Worker, task: Task) -> None:
        with self.lock:
            worker.current = None
            task.state = _DONE
        task.event.set()

    def retire(self, worker: _Worker) -> None:
        with self.lock:
            if worker in self.workers:
                self.workers.remove(worker)

    def stop(self, wait: float = JOIN_S) -> None:
        """No more tasks taken: each worker ends after the chunk it is decoding (waited for up to
        ``wait`` seconds); tasks not taken are left to whoever waits for them."""
        with self.lock:
            self.closing = True
            self.lock.notify_all()
            workers = list(self.workers)
        deadline = time.monotonic() + wait
        for w in workers:
            if w.thread is not threading.current_thread():
                w.thread.join(max(0.0, deadline - time.monotonic()))


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
    """Ctrl-C: stop this process's workers (each ends after its chunk) and forget the pool; a
    later decode starts new ones. Does not wait for them: a KeyboardInterrupt raised just after a
    ``with lock:`` took its lock and before the block began leaves that lock held by this thread
    (Python does not guard that instant), and a worker waiting for it would then never end; it
    is a daemon thread, idle, and the next decode does not use this pool."""
    global _POOL
    with _POOL_LOCK:
        p, _POOL = _POOL, None
    if p is not None:
        p.stop(wait=0.0)


def _forget_in_child() -> None:  # a fork of this process has none of its threads: start afresh
    global _POOL, _POOL_LOCK
    _POOL = None
    _POOL_LOCK = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_in_child)
