"""Long mutation-fuzz runs of the decoder (issue 8).

    python benchmarks/fuzz.py --cases 100000 [--seed 1] [--workers 2] [--timeout 5] [--mem-mb 1024]

Each case is a mutated copy of a real encoder output (the mutator of ``tests/test_fuzz.py``: bit
flips, byte writes, truncations, insertions, deletions, length/count/offset fields set to boundary
values, manifest values replaced, splices of two files, about half the cases with every CRC
recomputed). Case ``i`` of seed ``S`` is always the same file, so any case can be replayed with
``--replay i``. ``--self-check`` makes cases 1-4 hang, exhaust memory, raise and segfault on
purpose and checks that each is caught and classified (the harness's own test).

Cases run in a pool of worker processes. Each worker caps its address space with
``resource.setrlimit(RLIMIT_AS)`` at its size after start-up plus ``--mem-mb``, and decodes each
case front to back (``tqcodec.load``) and by random access (``tqcodec.open``, every tensor) with a
decoder limit of 64 MiB per tensor. The parent kills and replaces a worker that takes more than
``--timeout`` seconds on one case.

Outcomes: ``ok``; ``TqzError:<CODE>``; ``uncaught:<Type>`` (any other exception: a bug);
``disagree`` (load decoded but open did not, or to other tensors: a bug); ``hang`` (timeout);
``over-memory`` (MemoryError, or "out of memory" reported by the decoder); ``died`` (the worker
process died, e.g. a segfault). The counts, cases/s and the command go to stdout and to
``benchmarks/results/fuzz-<cases>-seed<S>.json``; the bytes of every case that is not ``ok`` or
``TqzError`` go to ``benchmarks/results/fuzz-crashers/``.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
BAD = ("uncaught", "disagree", "hang", "over-memory", "died")


def case_bytes(seed: int, case: int, seeds: list[bytes]) -> bytes:
    from tests.test_fuzz import mutate
    rng = random.Random(f"tqz-fuzz:{seed}:{case}")
    return mutate(rng.choice(seeds), rng, seeds)


def run_case(data: bytes) -> str:
    """Outcome label of one file (both decoders)."""
    import tqcodec
    from tqcodec.limits import Limits
    from tests.test_fuzz import decode_load, decode_open

    limits = Limits(max_tensor_bytes=64 << 20)
    results = []
    for fn in (decode_load, decode_open):
        try:
            results.append(("ok", fn(data, limits)))
        except tqcodec.TqzError as exc:
            if exc.code == "LIMIT_EXCEEDED" and "out of memory" in exc.message:
                return "over-memory"
            results.append(("err", exc.code))
        except MemoryError:
            return "over-memory"
        except Exception as exc:  # noqa: BLE001 - this is what the fuzzer looks for
            return f"uncaught:{type(exc).__name__}"
    (a, va), (b, vb) = results
    if a == "ok" and (b != "ok" or va != vb):
        return "disagree"
    return "ok" if a == "ok" else f"TqzError:{va}"


def _vm_bytes() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _injected(case: int) -> str:
    """--self-check: cases 1-4 misbehave on purpose, to show each is caught and classified."""
    import signal
    if case == 1:
        time.sleep(3600)
    if case == 2:
        try:
            bytearray(8 << 30)
        except MemoryError:
            return "over-memory"
    if case == 3:
        try:
            raise ValueError("injected")
        except ValueError as exc:
            return f"uncaught:{type(exc).__name__}"
    if case == 4:
        os.kill(os.getpid(), signal.SIGSEGV)
    return ""


def worker(conn, seed: int, mem_mb: int, self_check: bool = False) -> None:
    sys.path.insert(0, str(ROOT))
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import warnings
    warnings.simplefilter("ignore")
    import resource

    import torch
    torch.set_num_threads(1)
    from tests.test_fuzz import seed_files
    seeds = seed_files()
    run_case(seeds[0])  # warm up every import before the cap
    cap = _vm_bytes() + (mem_mb << 20)
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    conn.send(("ready", cap))
    while True:
        case = conn.recv()
        if case is None:
            return
        try:
            label = (self_check and _injected(case)) or run_case(case_bytes(seed, case, seeds))
        except MemoryError:
            label = "over-memory"
        conn.send((case, label))


class Slot:
    """One worker process and the case it is running."""

    def __init__(self, ctx, seed: int, mem_mb: int, self_check: bool = False):
        self.parent, child = ctx.Pipe()
        self.proc = ctx.Process(target=worker, args=(child, seed, mem_mb, self_check), daemon=True)
        self.proc.start()
        child.close()
        msg = self.parent.recv()
        assert msg[0] == "ready"
        self.case = None
        self.started = 0.0

    def submit(self, case: int) -> None:
        self.case = case
        self.started = time.monotonic()
        self.parent.send(case)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.join()
        self.parent.close()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=10000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=5.0, help="seconds per case")
    ap.add_argument("--mem-mb", type=int, default=1024, help="address space a worker may add while decoding")
    ap.add_argument("--replay", type=int, default=None, help="run one case here and print its outcome")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--self-check", action="store_true",
                    help="make cases 1-4 hang, exhaust memory, raise and segfault; check they are counted")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))

    if args.replay is not None:
        from tests.test_fuzz import seed_files
        data = case_bytes(args.seed, args.replay, seed_files())
        print(f"case {args.replay}: {len(data)} bytes -> {run_case(data)}")
        return 0

    ctx = mp.get_context("spawn")
    slots = [Slot(ctx, args.seed, args.mem_mb, args.self_check) for _ in range(args.workers)]
    counts: Counter = Counter()
    bad_cases: list[tuple[int, str]] = []
    next_case = 0
    done = 0
    t0 = time.monotonic()
    last_report = t0
    for s in slots:
        if next_case < args.cases:
            s.submit(next_case)
            next_case += 1
    import multiprocessing.connection as mpc
    while done < args.cases:
        busy = [s for s in slots if s.case is not None]
        ready = mpc.wait([s.parent for s in busy], timeout=0.2)
        now = time.monotonic()
        for i, s in enumerate(slots):
            if s.case is None:
                continue
            label = None
            if s.parent in ready:
                try:
                    case, label = s.parent.recv()
                except (EOFError, OSError):
                    label = "died"
            elif now - s.started > args.timeout:
                label = "hang"
            elif not s.proc.is_alive():
                label = "died"
            if label is None:
                continue
            counts[label] += 1
            done += 1
            if label.split(":")[0] in BAD:
                bad_cases.append((s.case, label))
            if label in ("hang", "died"):
                s.kill()
                slots[i] = s = Slot(ctx, args.seed, args.mem_mb, args.self_check)
            s.case = None
            if next_case < args.cases:
                s.submit(next_case)
                next_case += 1
        if now - last_report > 30:
            last_report = now
            print(f"[{done}/{args.cases}] {done / (now - t0):.0f} cases/s  bad={len(bad_cases)}", flush=True)
    elapsed = time.monotonic() - t0
    for s in slots:
        s.parent.send(None)
        s.proc.join(5)
        if s.proc.is_alive():
            s.kill()

    summary = {
        "command": " ".join([Path(sys.executable).name, "benchmarks/fuzz.py"] + (argv or sys.argv[1:])),
        "cases": args.cases, "seed": args.seed, "workers": args.workers, "timeout_s": args.timeout,
        "mem_mb": args.mem_mb, "seconds": round(elapsed, 1), "cases_per_s": round(args.cases / elapsed, 1),
        "bad": sum(1 for _ in bad_cases),
        "counts": dict(sorted(counts.items(), key=lambda kv: -kv[1])),
        "bad_cases": bad_cases[:1000],
    }
    if args.self_check:
        want = {1: "hang", 2: "over-memory", 3: "uncaught:ValueError", 4: "died"}
        got = {c: lab for c, lab in bad_cases}
        ok = all(got.get(c) == lab for c, lab in want.items()) and len(bad_cases) == 4
        print(f"self-check {'passed' if ok else 'FAILED'}: {got}")
        return 0 if ok else 1
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = args.out or RESULTS / f"fuzz-{args.cases}-seed{args.seed}.json"
    out.write_text(json.dumps(summary, indent=1) + "\n")
    if bad_cases:
        from tests.test_fuzz import seed_files
        folder = RESULTS / "fuzz-crashers"
        folder.mkdir(exist_ok=True)
        seeds = seed_files()
        for case, label in bad_cases[:200]:
            (folder / f"seed{args.seed}-case{case}-{label.replace(':', '_')}.tqz").write_bytes(
                case_bytes(args.seed, case, seeds))
    print(json.dumps({k: v for k, v in summary.items() if k != "bad_cases"}, indent=1))
    print(f"{'FAIL' if bad_cases else 'PASS'}: {len(bad_cases)} cases uncaught, disagreeing, hanging, "
          f"over memory or killing their worker; results in {out}")
    return 1 if bad_cases else 0


if __name__ == "__main__":
    sys.exit(main())
