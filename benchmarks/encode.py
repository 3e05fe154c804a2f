"""What an encode of MiniLM (and digits) costs a user: peak memory over the interpreter, and wall time
on a quiet machine and beside a CPU-bound neighbour (issue 16).

    .venv/bin/python benchmarks/encode.py [--bits 4] [--models minilm,digits] [--json benchmarks/results/encode.json]

Every encode is the real command line, ``python -m tqcodec encode MODEL.pt --bits B [--stats S]``,
in a process of its own; its peak resident memory is read from the kernel (``ru_maxrss`` of the
child) and reported over the interpreter's own (the same command with ``--version``: Python, torch
and tqcodec loaded, no model). Cases: data-free (no statistics), with statistics (the benchmark's
calibration batches, computed once by ``tqcodec.calibrate`` and saved; the encode reads the file),
and the calibration itself. The calibrated encode runs twice more: on its own, and with one other
CPU-bound process (``python -c "while True: pass"``, started and stopped by this script) beside it;
the ratio of the two wall times is the slowdown a user sees on a busy machine. The load average is
recorded at every run, and so are the CPU seconds (user + system) of the encode: on a shared machine
the wall time says how much of the CPUs it got, the CPU time how much work it did. The quiet run
first waits (up to ``--quiet-wait`` seconds) for a second in which 85% of the CPUs were idle
(``machine.wait_for_quiet``; the idle fraction is recorded). Each model is a section of the JSON file. Needs the bench extras (``make
bench-install``).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import tqcodec  # noqa: E402
from benchmarks.machine import QUIET_WAIT, wait_for_quiet  # noqa: E402
from benchmarks.rd import MODELS, Context  # noqa: E402


def run(cmd: list[str]) -> dict:
    """Run ``cmd`` in a child process: wall and CPU seconds, and the load average before it."""
    load = os.getloadavg()
    before = os.times()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = os.times()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr}")
    cpu = (after.children_user - before.children_user) + (after.children_system - before.children_system)
    return {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "load_before": [round(x, 2) for x in load],
            "stdout": proc.stdout.strip()}


def peak_rss_mib(cmd: list[str]) -> tuple[float, dict]:
    """``run(cmd)`` with the child's peak RSS: ru_maxrss of the children grows to the largest child
    so far, so each measured command runs in a fresh helper process of its own."""
    probe = [sys.executable, "-c",
             "import resource, subprocess, sys, json, time; t = time.perf_counter(); "
             "p = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
             "print(json.dumps({'rc': p.returncode, 'maxrss_kib': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, "
             "'wall_s': time.perf_counter() - t, 'out': p.stdout.strip(), 'err': p.stderr[-2000:]}))", *cmd]
    load = os.getloadavg()
    res = json.loads(subprocess.run(probe, capture_output=True, text=True, check=True).stdout)
    if res["rc"] != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{res['err']}")
    return res["maxrss_kib"] / 1024, {"wall_s": round(res["wall_s"], 2), "load_before": [round(x, 2) for x in load],
                                      "stdout": res["out"]}


def measure(name: str, args: argparse.Namespace, work: Path) -> dict:
    """Every measurement of one model of ``benchmarks.rd.MODELS``."""
    work.mkdir(parents=True, exist_ok=True)
    zoo = MODELS[name]
    ref = zoo.reference_state_dict()
    model = work / f"{name}.pt"
    torch.save(ref, model)
    ctx = Context(name, zoo, ref, model, work, args)
    module = zoo.build_module()
    module.load_state_dict(ref, strict=True)
    load = os.getloadavg()
    t0 = time.perf_counter()
    stats = tqcodec.calibrate(module, ctx.calibration_batches())
    calibration_s = time.perf_counter() - t0
    stats_path = work / "stats.safetensors"
    stats.save(str(stats_path))
    tqz = [sys.executable, "-m", "tqcodec"]
    base, _ = peak_rss_mib(tqz + ["--version"])
    rows = {"parameters": sum(v.numel() for v in ref.values()), "bits": args.bits,
            "interpreter_peak_mib": round(base, 1), "calibration_s": round(calibration_s, 2),
            "calibration_load_before": [round(x, 2) for x in load], "stats_file_bytes": stats_path.stat().st_size}
    cases = {"data-free": ["--bits", str(args.bits)],
             "with statistics": ["--bits", str(args.bits), "--stats", str(stats_path)]}
    for case, extra in cases.items():
        out = work / f"{case.replace(' ', '-')}.tqz"
        peak, info = peak_rss_mib(tqz + ["encode", str(model), "-o", str(out), "-f"] + extra)
        rows[case] = {"peak_mib": round(peak, 1), "peak_over_interpreter_mib": round(peak - base, 1),
                      "bytes": out.stat().st_size, **info}
        print(name, case, rows[case], flush=True)
    calibrated = tqz + ["encode", str(model), "-o", str(work / "c.tqz"), "-f"] + cases["with statistics"]
    idle = wait_for_quiet(args.quiet_wait)
    quiet = dict(run(calibrated), idle_before=idle)
    neighbour = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(2.0)
        busy = run(calibrated)
    finally:
        neighbour.kill()
        neighbour.wait()
    rows["calibrated encode, quiet"] = quiet
    rows["calibrated encode, one CPU-bound neighbour"] = busy
    rows["slowdown with a neighbour"] = round(busy["wall_s"] / quiet["wall_s"], 2)
    print(name, "calibrated encode", quiet, busy, flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bits", type=float, default=4.0)
    ap.add_argument("--models", default="minilm", help="comma-separated: minilm, digits")
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "encode.json"))
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--quiet-wait", type=float, default=QUIET_WAIT,
                    help="seconds to wait for idle CPUs before the quiet calibrated encode")
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="tqz-encode-"))
    out: dict = {}
    for name in args.models.split(","):
        out[name] = measure(name, args, work / name)
    out["machine"] = {"cpus": os.cpu_count(), "affinity": len(os.sched_getaffinity(0)), "torch": torch.__version__,
                      "python": platform.python_version(), "tqcodec": tqcodec.__version__,
                      "note": "a shared machine: the load averages before each run say how quiet it was"}
    Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
