"""One thread budget for a run: torch's threads, numpy's BLAS and OpenMP pools, and worker
processes share it, so that work on a shared machine does not fight itself (threads waiting on each
other while a neighbour holds the cores).

The default is the cores this process may use (its CPU affinity, not the machine's count). A run
with ``jobs`` worker processes gives each worker ``threads // jobs`` threads (at least one).
``tqz`` also starts with ``OMP_WAIT_POLICY=PASSIVE`` (unless set): idle OpenMP threads sleep
instead of spinning on cores another process needs.
"""
from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator, Optional

import torch
from threadpoolctl import threadpool_limits

from .errors import fail


def available_cores() -> int:
    """The cores this process may run on (its affinity mask; the CPU count where there is none)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def check_threads(threads: Any) -> int:
    """``threads``: a positive int, or 0/None meaning :func:`available_cores`."""
    if threads is None or threads == 0:
        return available_cores()
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 0:
        raise fail("BAD_OPTION", f"threads must be a positive integer (0: every core this process may use), "
                                 f"got {threads!r}")
    return threads


def per_worker(threads: int, jobs: int) -> int:
    """Each of ``jobs`` worker processes' share of a budget of ``threads``."""
    return max(1, threads // max(1, jobs))


@contextlib.contextmanager
def budget(threads: Optional[int] = None) -> Iterator[int]:
    """Run the block with torch and numpy's thread pools at ``threads`` (default: every core this
    process may use); the previous settings come back after."""
    n = check_threads(threads)
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        with threadpool_limits(limits=n):
            yield n
    finally:
        torch.set_num_threads(old)
