"""Decode throughput before and after parallel decode (issue 16), with zstd and ZipNN references.

    .venv/bin/python benchmarks/decode_speed.py                       # MiniLM only
    .venv/bin/python benchmarks/decode_speed.py --large               # + the ~600M bf16 model of scale.py
    .venv/bin/python benchmarks/decode_speed.py --large --layers 4    # a smaller model of that family

Files (cached in ``benchmarks/results/tmp/``): MiniLM (float32) saved with ``mode="tq", bits=4``
(data-free) by the ``--before`` tree's writer, so that both readers read it (a newer writer may
use a feature an older reader lacks), and the synthetic Llama-like bf16 model of ``scale.py``
(its builder) saved by the same tree with ``encode_folder(mode="tq", bits=4, tq_scope="tensor")``.

Contenders, each timed in its own fresh interpreter (torch and tqcodec imported before the clock;
``--inner`` loads in a row: the first one "cold", i.e. with any worker (process or thread) started inside
the timing, the best of the others "warm"), in alternating rounds so that all see the same load, each after waiting (up to ``--quiet-wait``
seconds) for a second in which 85% of the CPUs were idle (the idle fraction is recorded):

- ``before jobs=1`` / ``before jobs=2``: ``tqcodec.load`` of the tree at ``--before`` (default:
  the commit this work started from, exported with ``git archive``): jobs=1 its default, jobs=2
  its process pool over tensors;
- ``after jobs=1`` / ``after jobs=2``: this tree's ``tqcodec.load`` (jobs=None, the default, is
  every CPU the process may use: 2 here);
- ``zstd`` and ``zipnn``: decompressing the model's float32 bytes (zstd level 3, one frame;
  ZipNN 0.5 with its defaults, byte input of dtype float32), the lossless references.

Parameters per second = parameters / seconds. ``os.getloadavg()`` is recorded with every timing
(the machine may be shared), and so are the CPU seconds of the interpreter and its worker
processes (psutil, sampled every 20 ms): on a shared machine the wall time says how much of the
CPUs a contender got, the CPU time how much work it did. Writes ``results/decode_speed.json`` and ``results/decode_speed.md``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import QUIET, QUIET_WAIT, describe, load_range, wait_for_quiet  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"
TMP = RESULTS / "tmp"
BEFORE_REV = "32f574f"  # the commit issue 16's decode work started from

CHILD = r"""
import json, os, sys, time
import numpy as np
import torch
kind, path, jobs, inner, params = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
if kind == "tqcodec":
    import tqcodec
    import tqcodec.api  # load() is imported on first use: before the clock, as torch is
    where = tqcodec.__file__
    def run():
        return tqcodec.load(path, jobs=jobs)
elif kind == "zstd":
    import zstandard
    where = zstandard.__version__
    data = open(path, "rb").read()
    def run():
        return np.frombuffer(zstandard.ZstdDecompressor().decompress(data), dtype=np.float32)
elif kind == "zipnn":
    import zipnn
    where = "zipnn"
    data = open(path, "rb").read()
    z = zipnn.ZipNN(input_format="byte", bytearray_dtype="float32")
    def run():
        return np.frombuffer(z.decompress(data), dtype=np.float32)
import threading
import psutil
me = psutil.Process()


class Cpu:
    # CPU seconds of this process (every thread) and of its descendants (worker processes,
    # sampled every 20 ms so that workers that exit before the end are counted)

    def __init__(self):
        self.seen = {}
        self.stop = threading.Event()
        self.base = self.total()
        self.t = threading.Thread(target=self.run, daemon=True)
        self.t.start()

    def sample(self):
        for p in me.children(recursive=True):
            try:
                c = p.cpu_times()
                self.seen[p.pid] = c.user + c.system
            except psutil.Error:
                pass

    def total(self):
        self.sample()
        c = me.cpu_times()
        return c.user + c.system + sum(self.seen.values())

    def run(self):
        while not self.stop.wait(0.02):
            self.sample()

    def end(self):
        self.stop.set()
        self.t.join()
        return self.total() - self.base


times, cpus, loads = [], [], []
for _ in range(inner):
    cpu = Cpu()
    t0 = time.perf_counter()
    out = run()
    times.append(time.perf_counter() - t0)
    cpus.append(cpu.end())
    loads.append(os.getloadavg()[0])
    del out
print(json.dumps({"times": times, "cpu_s": cpus, "loadavg_1min": loads, "module": where}))
"""


def export_before(rev: str) -> Path:
    """The tree at ``rev`` (``git archive``), cached."""
    dest = TMP / f"before-{rev}"
    if not (dest / "tqcodec" / "__init__.py").exists():
        dest.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "-C", str(REPO), "archive", rev], check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def run_child(kind: str, path: Path, jobs: int, inner: int, params: int, pythonpath: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(pythonpath))
    out = subprocess.run([sys.executable, "-c", CHILD, kind, str(path), str(jobs), str(inner), str(params)],
                         check=True, capture_output=True, text=True, env=env, cwd=tempfile.gettempdir())
    return json.loads(out.stdout.strip().splitlines()[-1])


def write_with(tree: Path, sd: dict, tqz: Path) -> None:
    """``sd`` saved with ``mode="tq", bits=4`` by the tqcodec of ``tree`` (in a child process), so
    that the file is one both trees read: a newer writer may use a feature the older reader lacks."""
    from safetensors.torch import save_file
    src = TMP / f"{tqz.stem}-source.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(src))
    code = ("import sys, tqcodec; from safetensors.torch import load_file; "
            "tqcodec.save(load_file(sys.argv[1]), sys.argv[2], mode='tq', bits=4)")
    subprocess.run([sys.executable, "-c", code, str(src), str(tqz)], check=True, cwd=tempfile.gettempdir(),
                   env=dict(os.environ, PYTHONPATH=str(tree)))
    src.unlink()


def minilm_files(before: Path) -> tuple[Path, Path, int]:
    sys.path.insert(0, str(REPO))
    import torch
    from benchmarks.zoo import minilm
    tqz, f32 = TMP / "minilm-tq4.tqz", TMP / "minilm-f32.bin"
    sd = minilm.reference_state_dict()
    params = sum(t.numel() for t in sd.values())
    if not tqz.exists():
        write_with(before, sd, tqz)
    if not f32.exists():
        f32.write_bytes(b"".join(t.to(torch.float32).contiguous().numpy().tobytes() for t in sd.values()))
    return tqz, f32, params


def large_files(layers: int, before: Path) -> tuple[Path, Path, int]:
    """The synthetic model's .tqz, written as ``scale.encoded`` writes it but by the tree at
    ``before`` (a file both trees read, as :func:`minilm_files`), and its float32 bytes."""
    sys.path.insert(0, str(HERE))
    import scale  # the builder of the synthetic bf16 model
    folder = TMP / f"synthetic-{layers}L"
    info = scale.generate(folder, dict(scale.CONFIG, layers=layers))
    tqz = TMP / f"synthetic-{layers}L-tq4-{before.name}.tqz"
    if not tqz.exists():
        t0 = time.time()
        code = ("import sys; from tqcodec import api; "
                "api.encode_folder(sys.argv[1], sys.argv[2], jobs=0, mode='tq', bits=4.0, tq_scope='tensor')")
        subprocess.run([sys.executable, "-c", code, str(folder), str(tqz)], check=True, cwd=tempfile.gettempdir(),
                       env=dict(os.environ, PYTHONPATH=str(before)))
        print(f"encoded {tqz.name} in {time.time() - t0:.0f} s", flush=True)
    f32 = TMP / f"synthetic-{layers}L-f32.bin"
    if not f32.exists():
        import torch
        from safetensors.torch import load_file
        with open(f32, "wb") as fh:
            for shard in sorted(folder.glob("*.safetensors")):
                for t in load_file(str(shard)).values():
                    fh.write(t.to(torch.float32).numpy().tobytes())
    return tqz, f32, info["parameters"]


def compressed(f32: Path, kind: str) -> Path:
    """The float32 bytes compressed by zstd (level 3) or ZipNN, cached; checked to round-trip."""
    out = f32.with_suffix(f".{kind}")
    if not out.exists():
        raw = f32.read_bytes()
        if kind == "zstd":
            import zstandard
            data = zstandard.ZstdCompressor(level=3).compress(raw)
            ok = zstandard.ZstdDecompressor().decompress(data) == raw
        else:
            import zipnn
            z = zipnn.ZipNN(input_format="byte", bytearray_dtype="float32")
            data = bytes(z.compress(bytearray(raw)))  # a copy: ZipNN rewrites its input buffer in place
            ok = bytes(zipnn.ZipNN(input_format="byte", bytearray_dtype="float32").decompress(data)) == raw
        if not ok:
            raise SystemExit(f"{kind} does not round-trip {f32}")
        out.write_bytes(data)
    return out


def measure(name: str, tqz: Path, f32: Path, params: int, before: Path, rounds: int, inner: int,
            quiet_wait: float = QUIET_WAIT, only: Optional[set] = None) -> dict:
    contenders = [("before jobs=1", "tqcodec", tqz, 1, before), ("before jobs=2", "tqcodec", tqz, 2, before),
                  ("after jobs=1", "tqcodec", tqz, 1, REPO), ("after jobs=2", "tqcodec", tqz, 2, REPO),
                  ("zstd (float32)", "zstd", f32.with_suffix(".zstd"), 1, REPO),
                  ("zipnn (float32)", "zipnn", f32.with_suffix(".zipnn"), 1, REPO)]
    contenders = [c for c in contenders if only is None or c[0] in only or c[0] == "before jobs=1"]
    for c in contenders:
        if c[1] != "tqcodec":
            compressed(f32, c[1])
    runs: dict[str, list] = {c[0]: [] for c in contenders}
    for r in range(rounds):
        for label, kind, path, jobs, tree in (contenders if r % 2 == 0 else contenders[::-1]):
            idle = wait_for_quiet(quiet_wait)
            res = run_child(kind, path, jobs, inner, params, tree)
            res["cpu_idle_before"] = idle
            runs[label].append(res)
            print(f"{name} round {r + 1}: {label:16} {['%.3f' % t for t in res['times']]} s, "
                  f"cpu {['%.2f' % t for t in res['cpu_s']]} s, load {res['loadavg_1min'][-1]:.2f}, "
                  f"idle before {idle:.2f}", flush=True)
    rows = {}
    for label, kind, path, jobs, tree in contenders:
        cold = [r["times"][0] for r in runs[label]]
        warm = [t for r in runs[label] for t in r["times"][1:]] or cold
        cpu = [c for r in runs[label] for c in (r["cpu_s"][1:] or r["cpu_s"])]
        rows[label] = {"file_bytes": path.stat().st_size, "cold_s_best": min(cold), "warm_s_best": min(warm),
                       "cold_mparams_per_s": round(params / min(cold) / 1e6, 2),
                       "warm_mparams_per_s": round(params / min(warm) / 1e6, 2),
                       "cpu_s_median": round(sorted(cpu)[len(cpu) // 2], 3),
                       "mparams_per_cpu_s": round(params / sorted(cpu)[len(cpu) // 2] / 1e6, 2),
                       "runs": runs[label]}
    base = rows["before jobs=1"]
    for label in rows:
        rows[label]["warm_speedup_vs_before_jobs1"] = round(base["warm_s_best"] / rows[label]["warm_s_best"], 2)
        rows[label]["cold_speedup_vs_before_jobs1"] = round(base["cold_s_best"] / rows[label]["cold_s_best"], 2)
    return {"parameters": params, "tqz": tqz.name, "contenders": rows}


def write_md(res: dict, path: Path) -> None:
    lines = ["# Decode throughput (benchmarks/decode_speed.py)", "",
             f"{res['cpus']} CPUs ({res['affinity']} usable), Python {res['python']}; best of R alternating rounds "
             f"of N loads per fresh interpreter (R and N under each model; cold = the first load, with any worker "
             f"start-up; warm = the best of the others). Load average (1 min) at each timing is in the JSON; "
             f"range {res['loadavg_range'][0]:.2f}-{res['loadavg_range'][1]:.2f} over the run.", ""]
    for model, m in res["models"].items():
        lines += [f"## {model}: {m['parameters']:,} parameters ({m['tqz']}; measured {m.get('measured', '?')})", "",
                  f"{m.get('rounds', res['rounds'])} rounds of {m.get('inner', res['inner'])} loads.", "",
                  "| contender | file bytes | cold s | cold Mparams/s | warm s | warm Mparams/s | warm vs before jobs=1 "
                  "| CPU s (all processes, median warm) | Mparams per CPU s | runs started on idle CPUs |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for label, r in m["contenders"].items():
            lines.append(f"| {label} | {r['file_bytes']:,} | {r['cold_s_best']:.3f} | {r['cold_mparams_per_s']} | "
                         f"{r['warm_s_best']:.3f} | {r['warm_mparams_per_s']} | "
                         f"{r['warm_speedup_vs_before_jobs1']}x | {r['cpu_s_median']:.2f} | {r['mparams_per_cpu_s']} | "
                         f"{sum(x.get('cpu_idle_before', 0) >= QUIET for x in r['runs'])}/{len(r['runs'])} |")
        lines.append("")
    path.write_text("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--large", action="store_true", help="also the synthetic bf16 model of scale.py")
    ap.add_argument("--layers", type=int, default=20, help="its layers (20: ~602M parameters)")
    ap.add_argument("--no-minilm", action="store_true")
    ap.add_argument("--before", default=BEFORE_REV, help="git revision to compare against")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--inner", type=int, default=3, help="loads per fresh interpreter")
    ap.add_argument("--large-rounds", type=int, default=2)
    ap.add_argument("--large-inner", type=int, default=2)
    ap.add_argument("--large-only", help="the large model's contenders, comma-separated labels (before jobs=1 "
                    "always runs: the others are compared with it), e.g. 'after jobs=2,zstd (float32)'")
    ap.add_argument("--quiet-wait", type=float, default=QUIET_WAIT,
                    help="seconds to wait for a second with 85%% of the CPUs idle before each timing")
    ap.add_argument("--out", default=str(RESULTS / "decode_speed.json"))
    ap.add_argument("--merge", action="store_true", help="keep the other models of an existing --out (each "
                    "model's section says when it was measured)")
    args = ap.parse_args()
    TMP.mkdir(parents=True, exist_ok=True)
    before = export_before(args.before)
    res = {"before": args.before, **describe(), "rounds": args.rounds, "inner": args.inner, "models": {}}
    if not args.no_minilm:
        tqz, f32, params = minilm_files(before)
        res["models"]["MiniLM (float32, tq 4 bits/param)"] = measure("minilm", tqz, f32, params, before,
                                                                      args.rounds, args.inner, args.quiet_wait)
        res["models"]["MiniLM (float32, tq 4 bits/param)"].update(rounds=args.rounds, inner=args.inner)
    if args.large:
        tqz, f32, params = large_files(args.layers, before)
        only = set(args.large_only.split(",")) if args.large_only else None
        res["models"][f"synthetic {args.layers}-layer bf16 (tq 4 bits/param)"] = measure(
            "large", tqz, f32, params, before, args.large_rounds, args.large_inner, args.quiet_wait, only)
        res["models"][f"synthetic {args.layers}-layer bf16 (tq 4 bits/param)"].update(rounds=args.large_rounds,
                                                                                     inner=args.large_inner)
    for m in res["models"].values():
        m["measured"] = time.strftime("%Y-%m-%d %H:%M")
    if args.merge and Path(args.out).exists():
        old = json.loads(Path(args.out).read_text())
        res["models"] = {**old.get("models", {}), **res["models"]}
    res["loadavg_range"] = load_range(x for m in res["models"].values() for r in m["contenders"].values()
                                      for run in r["runs"] for x in run["loadavg_1min"])
    res["loadavg_at_end"] = os.getloadavg()
    Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    write_md(res, Path(args.out).with_suffix(".md"))
    print(Path(args.out).with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
