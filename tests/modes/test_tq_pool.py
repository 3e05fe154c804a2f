"""The tq encoder's per-tensor work on threads (tqcodec.modes.tq.pool): the same bytes for every
thread count, results in order, errors that stop the work."""
from __future__ import annotations

import threading
import time

import pytest
import torch
import torch.nn as nn

import tqcodec
from tqcodec import threads as thread_budget
from tqcodec.modes.tq import allocation
from tqcodec.modes.tq.pool import each, grouped


def test_each_keeps_task_order_and_uses_the_threads():
    names = set()

    def slow_square(x: int) -> int:
        names.add(threading.current_thread().name)
        time.sleep(0.01 * (5 - x))  # the first tasks finish last
        return x * x

    assert list(each(slow_square, range(5), threads=3)) == [0, 1, 4, 9, 16]
    assert len(names) > 1 and all(n.startswith("tq-encoder") for n in names)
    names.clear()
    assert list(each(slow_square, range(3), threads=1)) == [0, 1, 4]
    assert names == {threading.current_thread().name}


def test_each_raises_the_first_error_and_drops_tasks_not_started():
    started = []

    def task(x: int) -> int:
        started.append(x)
        if x == 0:
            raise ValueError("bad tensor")
        time.sleep(0.05)
        return x

    with pytest.raises(ValueError, match="bad tensor"):
        list(each(task, range(40), threads=2))
    assert len(started) < 40


def test_grouped_keeps_first_appearance_order():
    assert grouped(["a1", "b1", "a2", "c1", "b2"], key=lambda s: s[0]) == [["a1", "a2"], ["b1", "b2"], ["c1"]]


def test_same_bytes_and_curves_on_one_and_two_threads(monkeypatch):
    # tensors above LAZY_ELEMENTS (matrices made when needed), one cut into row bands sharing
    # error-feedback results, transform options (n >= 2m, enough samples): every shared path
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 1200), nn.ReLU(), nn.Linear(1200, 96), nn.ReLU(), nn.Linear(96, 8))
    model.eval()
    x = torch.randn(320, 64)
    stats = tqcodec.calibrate(model, [x[i:i + 64] for i in range(0, 320, 64)])
    sd = model.state_dict()
    seen: dict[int, set] = {1: set(), 2: set()}
    curves: dict[int, dict] = {}
    evaluate = allocation.Unit.evaluate

    for n in (1, 2):
        def spy(self, code, feedback, keep=False, n=n):
            seen[n].add(threading.current_thread().name)
            out = evaluate(self, code, feedback, keep)
            curves.setdefault(n, {})[(self.name, id(self.data) if not isinstance(self.data, allocation.Rows)
                                      else self.data.key, self.r0, code, feedback)] = out
            return out
        monkeypatch.setattr(allocation.Unit, "evaluate", spy)
        with thread_budget.budget(n):
            data = tqcodec.encode_bytes(sd, stats=stats, bits=3.0)
        if n == 1:
            one = data
    assert data == one
    assert any(name.startswith("tq-encoder") for name in seen[2])
    assert not any(name.startswith("tq-encoder") for name in seen[1])
    by_name = lambda c: {(k[0], k[3], k[4], k[2]): v for k, v in c.items()}  # noqa: E731
    assert by_name(curves[1]) == by_name(curves[2])
