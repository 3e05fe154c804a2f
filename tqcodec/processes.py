"""What a run's worker processes start with (issue 16): their share of the thread budget, and
Ctrl-C left to the process the user started. Light on purpose (no torch); ``tqcodec.threads``
holds the budget itself.

Threads: a run has one budget (``tqcodec.threads.budget``, default every core this process may
use); each of ``jobs`` workers gets ``max(1, budget // jobs)`` threads.

Ctrl-C (SIGINT): the process the user started decides what it does: it cleans up (no temporary
file, no worker left), then ``tqz`` prints one line and exits 130, and the Python API raises
KeyboardInterrupt to its caller. Workers never act on it: they start with SIGINT blocked
(:func:`sigint_blocked`, inherited across fork and exec) and then ignore it.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import os
import signal
import threading
from typing import Iterator, Optional


# --- threads --------------------------------------------------------------------------------------

def available_cores() -> int:
    """The cores this process may run on (its affinity mask; the CPU count where there is none)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def per_worker(threads: int, jobs: int) -> int:
    """Each of ``jobs`` worker processes' share of a budget of ``threads``."""
    return max(1, threads // max(1, jobs))


BUDGETS: list[int] = []  # the budgets of the enclosing ``tqcodec.threads.budget`` blocks, innermost last


def current_budget() -> int:
    """The budget in force: that of the innermost ``tqcodec.threads.budget`` block, else every
    core this process may use."""
    return BUDGETS[-1] if BUDGETS else available_cores()


BLAS_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def worker_env(share: int, env: Optional[dict] = None) -> dict:
    """``env`` (default: this process's) with the BLAS and OpenMP pools at ``share`` threads: for
    a worker started as a new program, which reads them when it loads numpy."""
    env = dict(os.environ if env is None else env)
    for name in BLAS_ENV:
        env[name] = str(share)
    return env


@functools.lru_cache(maxsize=None)
def _libc() -> Optional[ctypes.CDLL]:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def trim_malloc() -> bool:
    """glibc: hand the free memory of every malloc arena back to the OS (``malloc_trim``; nothing
    elsewhere). Each thread that allocates gets an arena of its own, which keeps what it freed: a
    calibrated MiniLM encode on the tq encoder's 2 threads (``tqcodec.modes.tq.pool``) peaked at
    1,179 MB resident, 1,062-1,080 MB with a trim after each of its tasks (1,062 MB on one thread),
    in the same time (37 s, load 5). Returns whether memory was released."""
    libc = _libc()
    trim = getattr(libc, "malloc_trim", None) if libc is not None else None
    return bool(trim(0)) if trim is not None else False


# --- Ctrl-C ---------------------------------------------------------------------------------------


def _ours() -> bool:
    """Python's own SIGINT handler is in place and this is the main thread (the only one that
    may change it)."""
    return (threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGINT) is signal.default_int_handler)


@contextlib.contextmanager
def sigint_blocked() -> Iterator[None]:
    """SIGINT blocked in this thread for the block: a program started in it inherits the mask, so
    a Ctrl-C at the terminal (sent to the whole process group) never interrupts it, even before
    it has set SIGINT to ignored."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """A Ctrl-C during the block raises KeyboardInterrupt when the block ends, not inside it: for
    steps that must not be cut in the middle (starting a worker process: one cut while it is
    being handed its work would be left running, or fail on its own with a traceback)."""
    if not _ours():
        yield
        return
    seen: list[int] = []
    signal.signal(signal.SIGINT, lambda signum, frame: seen.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if seen:
        raise KeyboardInterrupt


@contextlib.contextmanager
def interrupt_wins() -> Iterator[None]:
    """A Ctrl-C during the block raises KeyboardInterrupt, whatever a library made of it: torch's
    C++ reader and writer turn a KeyboardInterrupt raised in a Python callback into a
    RuntimeError, or swallow it."""
    if not _ours():
        yield
        return
    seen: list[int] = []

    def handler(signum, frame):
        seen.append(signum)
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, handler)
    try:
        yield
    except Exception:
        if seen:
            raise KeyboardInterrupt from None
        raise
    else:
        if seen:  # a Ctrl-C that the block swallowed whole
            raise KeyboardInterrupt
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
