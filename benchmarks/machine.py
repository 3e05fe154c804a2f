"""The machine a timing ran on, for benchmarks that time on a shared machine (``decode_speed.py``,
``ship.py``): how idle its CPUs are, a wait for a quiet second before each timing, and what the
results record of it (CPUs, Python, the 1-minute load average)."""
from __future__ import annotations

import os
import sys
import time
from typing import Iterable

QUIET_WAIT = 120.0  # seconds to wait for idle CPUs before each timing (the scripts' --quiet-wait)
QUIET = 0.85  # the idle fraction of the CPUs that counts as quiet


def cpu_idle(seconds: float = 1.0) -> float:
    """The fraction of the machine's CPU time that was idle over the next ``seconds``."""
    def stat() -> tuple[int, int]:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return v[3] + v[4], sum(v)
    a = stat()
    time.sleep(seconds)
    b = stat()
    return (b[0] - a[0]) / max(1, b[1] - a[1])


def wait_for_quiet(max_wait: float = QUIET_WAIT, want: float = QUIET) -> float:
    """Wait (up to ``max_wait`` s) for a second in which ``want`` of the CPUs were idle: the
    machine is shared, and a contender timed while another job holds a core measures that job.
    Returns the idle fraction of the last second waited (recorded with the timing)."""
    deadline = time.monotonic() + max_wait
    idle = cpu_idle()
    while idle < want and time.monotonic() < deadline:
        idle = cpu_idle()
    return round(idle, 2)


def describe() -> dict:
    """CPUs (and those this process may use), Python, and the load average now."""
    return {"cpus": os.cpu_count(), "affinity": len(os.sched_getaffinity(0)), "python": sys.version.split()[0],
            "loadavg_at_start": os.getloadavg()}


def load_range(loads: Iterable[float]) -> list[float]:
    """[lowest, highest] of the 1-minute load averages recorded with the timings ([0, 0]: none)."""
    loads = list(loads)
    return [min(loads), max(loads)] if loads else [0, 0]
