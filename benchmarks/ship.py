"""Shipping a model over a network link: bf16 safetensors downloaded then loaded, against the
.tqz streamed and decoded while it downloads (issue 16).

    .venv/bin/python benchmarks/ship.py                    # MiniLM (bf16) at 12.5 and 125 MB/s
    .venv/bin/python benchmarks/ship.py --large            # + the ~600M bf16 synthetic model of scale.py
    .venv/bin/python benchmarks/ship.py --large --layers 4 # a smaller model of that family

A local HTTP/1.1 server (a subprocess of this script, bound to 127.0.0.1 only, ending when this
script closes its standard input or after ``--max-seconds``) serves the files at a paced rate:
every body is sent in pieces, each piece leaving no earlier than the link (one for all
connections) has carried the previous ones at ``rate`` bytes per second (12.5 MB/s = 100 Mbit/s,
125 MB/s = 1 Gbit/s; MB = 10^6 bytes). The server logs when each body started and finished
(``time.monotonic``, one clock for every process of the machine).

Each contender runs in a fresh interpreter (torch, safetensors, tqcodec, fsspec and aiohttp
imported before the clock) and is timed from its first request to the whole state dict in memory:

- ``safetensors (bf16)``: GET each file (MiniLM: one ``model.safetensors``; the large model: its
  shard index, config and shards, one after the other) into a temporary folder on disk, then
  ``safetensors.torch.load_file`` of each shard;
- ``tqz streamed``: ``dict(tqcodec.iter_tensors(url))`` (one GET; range-coded chunks decoded by
  worker threads as they arrive; jobs = every CPU this process may use, workers started inside
  the timing);
- ``tqz streamed, jobs=1`` (MiniLM only unless ``--large-jobs1``): the same in one thread.

Models: MiniLM (``zoo/minilm.reference_state_dict()`` cast to bfloat16; its .tqz: ``mode="tq",
bits=4``, data-free) and the synthetic Llama-like bf16 model of ``scale.py`` (its builder; the
.tqz: ``encode_folder(mode="tq", bits=4, tq_scope="tensor")``). Files are cached in
``benchmarks/results/tmp/``. Contenders alternate within each round; ``os.getloadavg()`` is
recorded with every timing, and each run first waits (up to ``--quiet-wait`` seconds) for a second
in which 85% of the CPUs were idle (the machine may be shared; the idle fraction is recorded).
Writes ``results/ship.json`` and ``results/ship.md``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import QUIET_WAIT, describe, load_range, wait_for_quiet  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"
TMP = RESULTS / "tmp"
MB = 10 ** 6


# --- the server (run as: ship.py --serve ROOT) ------------------------------------------------------

def serve(root: Path, max_seconds: float) -> None:
    import http.server
    import socket
    import urllib.parse

    root = root.resolve()
    lock = threading.Lock()
    link = {"free": 0.0}  # when the link has carried every piece scheduled so far
    out_lock = threading.Lock()

    def log(**kw) -> None:
        with out_lock:
            sys.stdout.write(json.dumps(kw) + "\n")
            sys.stdout.flush()

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True

        def log_message(self, *args: object) -> None:
            pass

        def setup(self) -> None:
            super().setup()
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 256 << 10)  # little slack in the kernel

        def do_GET(self) -> None:  # noqa: N802
            url = urllib.parse.urlsplit(self.path)
            rate = float(urllib.parse.parse_qs(url.query).get("rate", ["0"])[0])
            name = urllib.parse.unquote(url.path).lstrip("/")
            path = root / name
            if "/" in name or name.startswith(".") or not path.is_file() or rate <= 0:  # files of ROOT only
                body = b"not found"
                self.send_response(404)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                return
            size = path.stat().st_size
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(size))
            self.end_headers()
            piece = max(64 << 10, int(rate / 200))  # about 5 ms of link per piece
            start = time.monotonic()
            sent = 0
            try:
                with open(path, "rb") as fh:
                    while True:
                        data = fh.read(piece)
                        if not data:
                            break
                        with lock:
                            now = time.monotonic()
                            at = max(now, link["free"])
                            link["free"] = at + len(data) / rate
                        if at > now:
                            time.sleep(at - now)
                        self.wfile.write(data)
                        sent += len(data)
                self.wfile.flush()
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True
            log(path=url.path, bytes=sent, start=start, end=time.monotonic(), rate=rate)

    class Server(http.server.ThreadingHTTPServer):
        daemon_threads = True

    srv = Server(("127.0.0.1", 0), Handler)
    log(port=srv.server_address[1])

    def watchdog() -> None:  # bounded: stop on end of standard input or after max_seconds
        threading.Thread(target=lambda: (sys.stdin.read(), srv.shutdown()), daemon=True).start()
        time.sleep(max_seconds)
        srv.shutdown()

    threading.Thread(target=watchdog, daemon=True).start()
    srv.serve_forever(poll_interval=0.05)
    srv.server_close()


class Server:
    """The server subprocess: ``url(name, rate)``; ``events()``: its log lines so far."""

    def __init__(self, root: Path, max_seconds: float):
        self.proc = subprocess.Popen([sys.executable, __file__, "--serve", str(root), "--max-seconds", str(max_seconds)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        first = json.loads(self.proc.stdout.readline())
        self.port = first["port"]
        self.log: list[dict] = []
        self._t = threading.Thread(target=self._read, daemon=True)
        self._t.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.log.append(json.loads(line))

    def url(self, name: str, rate: float) -> str:
        return f"http://127.0.0.1:{self.port}/{name}?rate={int(rate)}"

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


# --- one contender, in a fresh interpreter -------------------------------------------------------------

CHILD = r"""
import json, os, shutil, sys, tempfile, time, urllib.request
import torch
import safetensors.torch
import tqcodec
import tqcodec.api  # iter_tensors is imported on first use: before the clock, as torch is
import fsspec.implementations.http, aiohttp  # what a URL needs, imported before the clock as torch is
kind, jobs, urls = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
t0 = time.monotonic()
first = None
if kind == "safetensors":
    tmp = tempfile.mkdtemp(prefix="ship-")
    files = []
    for url in urls:  # one after the other, as one link carries them
        name = url.split("?")[0].rsplit("/", 1)[-1]
        with urllib.request.urlopen(url) as r, open(os.path.join(tmp, name), "wb") as fh:
            shutil.copyfileobj(r, fh, 1 << 20)
        files.append(os.path.join(tmp, name))
    downloaded = time.monotonic()
    sd = {}
    for f in files:
        if f.endswith(".safetensors"):
            sd.update(safetensors.torch.load_file(f))
    end = time.monotonic()
    shutil.rmtree(tmp)
else:
    sd = {}
    for name, t in tqcodec.iter_tensors(urls[0], jobs=None if jobs == 0 else jobs):
        if first is None:
            first = time.monotonic()
        sd[name] = t
    downloaded = None
    end = time.monotonic()
print(json.dumps({"t0": t0, "end": end, "total_s": end - t0, "first_tensor_s": None if first is None else first - t0,
                  "downloaded_s": None if downloaded is None else downloaded - t0, "tensors": len(sd),
                  "parameters": sum(t.numel() for t in sd.values()), "loadavg_1min": os.getloadavg()[0]}))
"""


def run_child(kind: str, jobs: int, urls: list[str]) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", CHILD, kind, str(jobs)] + urls, capture_output=True, text=True,
                         env=env, cwd=str(TMP))
    if out.returncode != 0:
        raise SystemExit(f"{kind} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# --- the models ------------------------------------------------------------------------------------------

def minilm_files() -> dict:
    sys.path.insert(0, str(REPO))
    import torch
    from safetensors.torch import save_file
    import tqcodec
    from benchmarks.zoo import minilm
    folder = TMP / "ship-minilm"
    folder.mkdir(parents=True, exist_ok=True)
    st, tqz = folder / "model.safetensors", folder / "minilm-bf16-tq4.tqz"
    if not st.exists() or not tqz.exists():
        sd = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v).contiguous()
              for k, v in minilm.reference_state_dict().items()}
        save_file(sd, str(st))
        tqcodec.save(sd, tqz, mode="tq", bits=4)
    return {"name": "MiniLM (bf16)", "root": folder, "safetensors": ["model.safetensors"], "tqz": tqz.name}


def large_files(layers: int) -> dict:
    sys.path.insert(0, str(HERE))
    import scale  # the builder of the synthetic bf16 model (and its .tqz, shared with decode_speed.py)
    folder, tqz, info = scale.encoded(layers)
    root = TMP / f"ship-synthetic-{layers}L"  # what the server serves: links to the folder's files and the .tqz
    root.mkdir(exist_ok=True)
    shards = sorted(p.name for p in folder.glob("*.safetensors"))
    names = ["config.json", "model.safetensors.index.json"] + shards
    for name, src in [(n, folder / n) for n in names] + [(tqz.name, tqz)]:
        if not (root / name).exists():
            (root / name).symlink_to(src.resolve())
    return {"name": f"synthetic {layers}-layer bf16 ({info['parameters'] / 1e6:.0f}M parameters)", "root": root,
            "safetensors": names, "tqz": tqz.name}


# --- the runs ---------------------------------------------------------------------------------------------

def measure(model: dict, rates: list[float], rounds: int, jobs1: bool, max_seconds: float, quiet_wait: float) -> dict:
    root = model["root"]
    contenders = [("safetensors (bf16), download then load", "safetensors", 0),
                  ("tqz streamed", "tqz", 0)] + ([("tqz streamed, jobs=1", "tqz", 1)] if jobs1 else [])
    sizes = {"safetensors": sum((root / n).stat().st_size for n in model["safetensors"]),
             "tqz": (root / model["tqz"]).stat().st_size}
    out = {"model": model["name"], "bytes": sizes, "rates": {}}
    srv = Server(root, max_seconds)
    try:
        for rate in rates:
            runs: dict[str, list] = {c[0]: [] for c in contenders}
            for r in range(rounds):
                for label, kind, jobs in (contenders if r % 2 == 0 else contenders[::-1]):
                    names = model["safetensors"] if kind == "safetensors" else [model["tqz"]]
                    idle = wait_for_quiet(quiet_wait)
                    n0 = len(srv.log)
                    res = run_child(kind, jobs, [srv.url(n, rate) for n in names])
                    res["cpu_idle_before"] = idle
                    deadline = time.monotonic() + 10.0  # the server's log line of each body (late on a busy machine)
                    while len(srv.log) - n0 < len(names) and time.monotonic() < deadline:
                        time.sleep(0.05)
                    bodies = srv.log[n0:]
                    if bodies:
                        last = max(b["end"] for b in bodies)
                        res["last_byte_s"] = last - res["t0"]
                        res["after_last_byte_s"] = res["end"] - last
                        sent = sum(b["bytes"] for b in bodies)
                        busy = last - min(b["start"] for b in bodies)
                        res["link_mb_per_s"] = round(sent / busy / MB, 2) if busy > 0 else None
                    runs[label].append(res)
                    print(f"{model['name'][:24]:24} {rate / MB:6.1f} MB/s  {label:40} {res['total_s']:8.2f} s "
                          f"(last byte {res.get('last_byte_s', 0):.2f} s, load {res['loadavg_1min']:.2f}, idle before {idle:.2f})",
                          flush=True)
            summary = {}
            for label, kind, _ in contenders:
                best = min(runs[label], key=lambda x: x["total_s"])
                summary[label] = {"best_total_s": round(best["total_s"], 3),
                                  "median_total_s": round(sorted(x["total_s"] for x in runs[label])[len(runs[label]) // 2], 3),
                                  "bytes": sizes[kind], "runs": runs[label]}
            base = summary[contenders[0][0]]["best_total_s"]
            for label in summary:
                summary[label]["speedup_vs_safetensors"] = round(base / summary[label]["best_total_s"], 2)
            out["rates"][f"{rate / MB:g} MB/s"] = summary
    finally:
        srv.close()
    return out


def write_md(res: dict, path: Path) -> None:
    lines = ["# Shipping a model: bf16 safetensors vs .tqz streamed (benchmarks/ship.py)", "",
             f"Local HTTP server paced to each rate (one link for all connections); each contender in a fresh "
             f"interpreter, timed from its first request to the state dict in memory; best of {res['rounds']} "
             f"alternating rounds (the large model: {res['large_rounds']}). {res['cpus']} CPUs "
             f"({res['affinity']} usable); 1-min load average over the runs "
             f"{res['loadavg_range'][0]:.2f}-{res['loadavg_range'][1]:.2f} (each run's in the JSON).", ""]
    for m in res["models"]:
        lines += [f"## {m['model']}: safetensors {m['bytes']['safetensors']:,} bytes, .tqz {m['bytes']['tqz']:,} bytes", "",
                  "| link | contender | best s | median s | last byte at s | after last byte s | link MB/s | vs safetensors |",
                  "|---|---|---|---|---|---|---|---|"]
        for rate, rows in m["rates"].items():
            for label, r in rows.items():
                best = min(r["runs"], key=lambda x: x["total_s"])
                lines.append(f"| {rate} | {label} | {r['best_total_s']:.2f} | {r['median_total_s']:.2f} | "
                             f"{best.get('last_byte_s', 0):.2f} | {best.get('after_last_byte_s', 0):.2f} | "
                             f"{best.get('link_mb_per_s')} | {r['speedup_vs_safetensors']}x |")
        lines.append("")
    path.write_text("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--serve", help=argparse.SUPPRESS)
    ap.add_argument("--max-seconds", type=float, default=3600, help="the server stops after this long")
    ap.add_argument("--rates", default="12.5,125", help="link rates in MB/s (10^6 bytes)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--large", action="store_true")
    ap.add_argument("--layers", type=int, default=20)
    ap.add_argument("--large-rounds", type=int, default=1)
    ap.add_argument("--large-jobs1", action="store_true", help="also the one-thread .tqz run on the large model")
    ap.add_argument("--no-minilm", action="store_true")
    ap.add_argument("--quiet-wait", type=float, default=QUIET_WAIT,
                    help="seconds to wait for a second with 85%% of the CPUs idle before each run")
    ap.add_argument("--out", default=str(RESULTS / "ship.json"))
    args = ap.parse_args()
    if args.serve:
        serve(Path(args.serve), args.max_seconds)
        return
    TMP.mkdir(parents=True, exist_ok=True)
    rates = [float(x) * MB for x in args.rates.split(",")]
    res = {"rounds": args.rounds, "large_rounds": args.large_rounds, **describe(), "models": []}
    if not args.no_minilm:
        res["models"].append(measure(minilm_files(), rates, args.rounds, True, args.max_seconds, args.quiet_wait))
    if args.large:
        res["models"].append(measure(large_files(args.layers), rates, args.large_rounds, args.large_jobs1,
                                     args.max_seconds, args.quiet_wait))
    res["loadavg_range"] = load_range(run["loadavg_1min"] for m in res["models"] for rows in m["rates"].values()
                                      for r in rows.values() for run in r["runs"])
    res["loadavg_at_end"] = os.getloadavg()
    Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    write_md(res, Path(args.out).with_suffix(".md"))
    print(Path(args.out).with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
