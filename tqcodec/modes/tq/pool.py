"""The tq encoder's per-tensor work (rate-distortion curve points, error-feedback rounding, the
damped inverses of H) on the run's thread budget (``tqcodec.threads``; issue 16).

Threads, not processes: the work is numpy on [n, m] float64 matrices and LAPACK factorisations,
which run without the GIL, and the units (their matrices made when needed, their caches of levels)
stay in this process. Each task is a group of units that share nothing with other groups (the
bands of one tensor: one shared error-feedback cache and one lazily made matrix), runs its units in
the order a single thread would, and fills only its own units' curves and caches; BLAS stays at
one thread (the encoder's ``threadpool_limits``). So the curves, the choices and the bytes are the
same for every thread count.
"""
from __future__ import annotations

import concurrent.futures as cf
from typing import Callable, Iterable, Iterator, Sequence, TypeVar

from ...processes import trim_malloc

T = TypeVar("T")
R = TypeVar("R")


def each(fn: Callable[[T], R], tasks: Iterable[T], threads: int) -> Iterator[R]:
    """``fn(task)`` for each task, results in task order; with ``threads`` > 1 on that many
    threads. An error (or Ctrl-C in the caller) cancels the tasks not yet started and waits only
    for the running ones."""
    tasks = list(tasks)
    if threads <= 1 or len(tasks) <= 1:
        for task in tasks:
            yield fn(task)
        return
    pool = cf.ThreadPoolExecutor(max_workers=min(threads, len(tasks)), thread_name_prefix="tq-encoder")
    try:
        futures = [pool.submit(_trimmed, fn, task) for task in tasks]
        for fut in futures:
            yield fut.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def run(fn: Callable[[T], None], tasks: Iterable[T], threads: int) -> None:
    """:func:`each` for its effects."""
    for _ in each(fn, tasks, threads):
        pass


def grouped(items: Sequence[T], key: Callable[[T], object]) -> list[list[T]]:
    """``items`` in groups of equal ``key``, groups in order of first appearance, items in order."""
    groups: dict[object, list[T]] = {}
    for x in items:
        groups.setdefault(key(x), []).append(x)
    return list(groups.values())


def _trimmed(fn: Callable[[T], R], task: T) -> R:
    """``fn(task)``, then the memory it freed handed back to the OS (:func:`trim_malloc`)."""
    try:
        return fn(task)
    finally:
        trim_malloc()
