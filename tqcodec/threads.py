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
from .processes import BLAS_ENV, BUDGETS, available_cores, current_budget, per_worker, worker_env

__all__ = ["BLAS_ENV", "available_cores", "budget", "check_threads", "current", "limit_this_process", "per_worker",
           "worker_env"]
current = current_budget


def check_threads(threads: Any) -> int:
    """``threads``: a positive int, or 0/None meaning :func:`available_cores`."""
    if threads is None or threads == 0:
        return available_cores()
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 0:
        raise fail("BAD_OPTION", f"threads must be a positive integer (0: every core this process may use), "
                                 f"got {threads!r}")
    return threads


def limit_this_process(share: int) -> None:
    """A worker process's share of the budget, for the rest of its life: torch's intra-op
    threads, and numpy's BLAS and OpenMP pools (threadpoolctl; already loaded by a forkserver's
    preload, so the environment would come too late); the environment too, for programs it
    starts; and the budget :func:`current` gives there (the tq encoder's threads)."""
    BUDGETS[:] = [share]
    os.environ.update({name: str(share) for name in BLAS_ENV})
    torch.set_num_threads(share)
    threadpool_limits(limits=share)


@contextlib.contextmanager
def budget(threads: Optional[int] = None) -> Iterator[int]:
    """Run the block with torch and numpy's thread pools at ``threads`` (default: every core this
    process may use); the previous settings come back after."""
    n = check_threads(threads)
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    BUDGETS.append(n)
    try:
        with threadpool_limits(limits=n):
            yield n
    finally:
        BUDGETS.pop()
        torch.set_num_threads(old)
