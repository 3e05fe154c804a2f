"""Scale benchmark (issue 9): a synthetic ~600M-parameter bf16 model in sharded safetensors,
encoded (data-free tq at 4 bits per parameter, tq_scope "tensor") and decoded to a Hugging Face
folder with jobs=1 and jobs=2: wall time, peak RSS over the interpreter baseline, bytes.

    .venv/bin/python benchmarks/scale.py                 # ~600M parameters, writes results/scale.json
    .venv/bin/python benchmarks/scale.py --layers 2      # a quick small run
    .venv/bin/python benchmarks/scale.py --cli           # tqz encode MODEL --bits 4 (tq_scope model): peak RSS

Every phase runs in a fresh child process, which measures its own memory:
- ``main_peak_mib``: the child's VmHWM (reset through /proc/self/clear_refs after imports) minus
  its RSS after imports (the interpreter baseline);
- ``tree_peak_mib``: the largest sum, over the child and its worker processes, of each process's
  RSS minus the RSS it had when first seen (psutil, sampled every 20 ms): the working memory of
  the whole process tree over the baselines of its interpreters.
The model is generated shard by shard (one shard of tensors in memory at a time) and cached in
``benchmarks/results/tmp/`` (gitignored).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
TMP = RESULTS / "tmp"

# Llama-like (GQA 12/4 heads): hidden 1536, MLP 4096, vocab 32000, untied head; 20 layers -> 604M parameters
CONFIG = {"hidden": 1536, "intermediate": 4096, "vocab": 32000, "layers": 20, "heads": 12, "kv_heads": 4}


def tensor_specs(cfg: dict) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, kind) in shard order: embed, layers, final norm, head."""
    h, f, v = cfg["hidden"], cfg["intermediate"], cfg["vocab"]
    kv = h * cfg["kv_heads"] // cfg["heads"]
    out = [("model.embed_tokens.weight", (v, h), "embed")]
    for i in range(cfg["layers"]):
        p = f"model.layers.{i}."
        out += [(p + "input_layernorm.weight", (h,), "norm"),
                (p + "self_attn.q_proj.weight", (h, h), "in"), (p + "self_attn.k_proj.weight", (kv, h), "in"),
                (p + "self_attn.v_proj.weight", (kv, h), "in"), (p + "self_attn.o_proj.weight", (h, h), "out"),
                (p + "post_attention_layernorm.weight", (h,), "norm"),
                (p + "mlp.gate_proj.weight", (f, h), "in"), (p + "mlp.up_proj.weight", (f, h), "in"),
                (p + "mlp.down_proj.weight", (h, f), "out")]
    out += [("model.norm.weight", (h,), "norm"), ("lm_head.weight", (v, h), "embed")]
    return out


def make_tensor(name: str, shape: tuple[int, ...], kind: str, outliers):
    """Realistic statistics: Gaussian rows with log-normal per-row scales (std ~ 1/sqrt(fan_in)),
    a few outlier input channels (x8) shared by the layers reading the residual stream, norms
    near 1 with a spread."""
    import torch
    g = torch.Generator().manual_seed(int(hashlib.sha256(name.encode()).hexdigest()[:8], 16))
    if kind == "norm":
        return (1.0 + 0.1 * torch.randn(shape, generator=g)).to(torch.bfloat16)
    fan_in = shape[1]
    rows = torch.exp(0.35 * torch.randn(shape[0], 1, generator=g)) / math.sqrt(fan_in)
    t = torch.randn(shape, generator=g)
    t.mul_(rows)
    if kind == "in":
        t[:, outliers] *= 8.0
    if kind == "embed":
        t.mul_(math.sqrt(fan_in) * 0.02)
    return t.to(torch.bfloat16)


def generate(folder: Path, cfg: dict, shard_bytes: int = 300 << 20) -> dict:
    """Write the model shard by shard (at most one shard in memory); skip if cached."""
    import torch
    from safetensors.torch import save_file

    specs = tensor_specs(cfg)
    params = sum(math.prod(s) for _, s, _ in specs)
    stamp = folder / ".complete"
    key = json.dumps(cfg, sort_keys=True)
    if stamp.exists() and stamp.read_text() == key:
        return {"parameters": params, "cached": True}
    import shutil
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    outliers = torch.randperm(cfg["hidden"], generator=torch.Generator().manual_seed(1))[:cfg["hidden"] // 128]
    groups, size = [[]], 0
    for spec in specs:
        n = 2 * math.prod(spec[1])
        if groups[-1] and size + n > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(spec)
        size += n
    weight_map = {}
    t0 = time.time()
    for i, group in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        shard = {name: make_tensor(name, shape, kind, outliers) for name, shape, kind in group}
        save_file(shard, str(folder / fname), metadata={"format": "pt"})
        del shard
        weight_map.update({name: fname for name, _, _ in group})
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": 2 * params}, "weight_map": weight_map}, indent=2))
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": cfg["hidden"],
        "intermediate_size": cfg["intermediate"], "num_hidden_layers": cfg["layers"],
        "num_attention_heads": cfg["heads"], "num_key_value_heads": cfg["kv_heads"],
        "vocab_size": cfg["vocab"], "torch_dtype": "bfloat16", "tie_word_embeddings": False}, indent=2))
    (folder / "generation_config.json").write_text('{"bos_token_id": 1, "eos_token_id": 2}\n')
    stamp.write_text(key)
    return {"parameters": params, "cached": False, "generate_s": round(time.time() - t0, 1)}


def encoded(layers: int) -> tuple[Path, Path, dict]:
    """The synthetic model of ``layers`` layers (generated if not cached) and its .tqz for the
    decode benchmarks (``decode_speed.py``, ``ship.py``): ``encode_folder(mode="tq", bits=4,
    tq_scope="tensor")`` on every core, cached in ``TMP``. (folder, .tqz, ``generate``'s info.)"""
    from tqcodec import api
    folder = TMP / f"synthetic-{layers}L"
    info = generate(folder, dict(CONFIG, layers=layers))
    tqz = TMP / f"synthetic-{layers}L-tq4.tqz"
    if not tqz.exists():
        t0 = time.time()
        api.encode_folder(folder, tqz, jobs=0, mode="tq", bits=4.0, tq_scope="tensor")
        print(f"encoded {tqz.name} in {time.time() - t0:.0f} s", flush=True)
    return folder, tqz, info


# --- one phase, in a child process --------------------------------------------------------------

def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


class TreeSampler:
    """Every 20 ms: sum over this process and its descendants of (RSS - RSS when first seen)."""

    def __init__(self, base_self: int):
        import psutil
        self.me = psutil.Process()
        self.first: dict[int, int] = {self.me.pid: base_self}
        self.peak = 0
        self.workers_peak = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        import psutil
        while not self._stop.is_set():
            total = 0
            workers = 0
            for p in [self.me] + self.me.children(recursive=True):
                try:
                    rss = p.memory_info().rss
                except psutil.Error:
                    continue
                base = self.first.setdefault(p.pid, rss)
                total += max(0, rss - base)
                if p.pid != self.me.pid:
                    workers += max(0, rss - base)
            self.peak = max(self.peak, total)
            self.workers_peak = max(self.workers_peak, workers)
            self._stop.wait(0.02)

    def stop(self) -> None:
        self._stop.set()
        self._t.join()


def run_phase(args: argparse.Namespace) -> None:
    import torch  # noqa: F401  (the interpreter baseline includes torch and tqcodec)
    from tqcodec import api
    base = _status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    sampler = TreeSampler(base)
    t0 = time.perf_counter()
    if args.phase == "encode":
        kw = {"mode": "tq", "bits": 4.0, "tq_scope": "tensor"} if args.mode == "tq" else {"mode": args.mode}
        n = api.encode_folder(args.src, args.dst, jobs=args.jobs, **kw)
        extra = {"bytes": n, "sha256": hashlib.sha256(Path(args.dst).read_bytes()).hexdigest()}
    else:
        shards = api.decode_folder(args.src, args.dst, jobs=args.jobs, overwrite=True, shard_size=2 * 10**9)
        extra = {"shards": len(shards)}
    wall = time.perf_counter() - t0
    sampler.stop()
    print(json.dumps({"wall_s": round(wall, 2), "main_peak_mib": round((_status("VmHWM") - base) / 2**20, 1),
                      "tree_peak_mib": round(sampler.peak / 2**20, 1),
                      "workers_peak_mib": round(sampler.workers_peak / 2**20, 1),
                      "baseline_mib": round(base / 2**20, 1), **extra}))


def child(phase: str, src: Path, dst: Path, jobs: int, mode: str) -> dict:
    cmd = [sys.executable, __file__, "--phase", phase, "--src", str(src), "--dst", str(dst), "--jobs", str(jobs),
           "--mode", mode]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def quality(src: Path, dec: Path, names: list[str]) -> dict:
    """Relative L2 error of a few tensors, decoded folder against the original."""
    from safetensors import safe_open
    idx_src = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    idx_dec = json.loads((dec / "model.safetensors.index.json").read_text())["weight_map"] \
        if (dec / "model.safetensors.index.json").exists() else {}
    out = {}
    for n in names:
        with safe_open(str(src / idx_src[n]), "pt") as f:
            a = f.get_tensor(n).float()
        with safe_open(str(dec / idx_dec.get(n, "model.safetensors")), "pt") as f:
            b = f.get_tensor(n).float()
        out[n] = round(float((a - b).norm() / a.norm()), 4)
    return out


def minilm_speed() -> dict:
    """MiniLM (22.7M parameters, float32): encode (data-free tq, 4 bits, tq_scope tensor) and
    decode with jobs=1 and 2, in this process (needs the bench extras; skipped without them)."""
    try:
        sys.path.insert(0, str(HERE.parent))
        from benchmarks.zoo import minilm
        sd = minilm.original_state_dict()
    except Exception as exc:  # noqa: BLE001 - an optional part of the benchmark
        return {"skipped": f"MiniLM weights not available ({type(exc).__name__}: {exc})"}
    from tqcodec import api
    params = sum(t.numel() for t in sd.values())
    out = {"parameters": params}
    path = TMP / "minilm.tqz"
    for jobs in (1, 2):
        t0 = time.perf_counter()
        n = api.save(sd, path, mode="tq", bits=4.0, tq_scope="tensor", jobs=jobs)
        enc = time.perf_counter() - t0
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        t0 = time.perf_counter()
        api.load(path, jobs=jobs)
        dec = time.perf_counter() - t0
        out[f"jobs{jobs}"] = {"encode_s": round(enc, 2), "decode_s": round(dec, 2), "bytes": n, "sha256": digest,
                              "encode_mparams_per_s": round(params / enc / 1e6, 2),
                              "decode_mparams_per_s": round(params / dec / 1e6, 2)}
    out["identical_bytes_jobs1_jobs2"] = out["jobs1"]["sha256"] == out["jobs2"]["sha256"]
    return out


def _hwm_kib(pid: int) -> int:
    """VmHWM (peak RSS) of a live process, in KiB (0 once it has gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def cli_encode(model: Path, out: Path, bits: float, max_seconds: float) -> dict:
    """``python -m tqcodec encode MODEL -o OUT --bits B`` as a user runs it (tq_scope "model", the
    command's default: one allocation over the whole model), its peak RSS (VmHWM, read every
    second, so a run stopped at ``max_seconds`` still reports the peak it reached) over the
    interpreter's own (``tqz --version``), wall time, and the load average before and after."""
    cmd = [sys.executable, "-m", "tqcodec", "encode", str(model), "-o", str(out), "--bits", f"{bits:g}", "-f"]
    env = dict(os.environ, PYTHONPATH=str(HERE.parent) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    probe = subprocess.Popen([sys.executable, "-m", "tqcodec", "--version"], env=env, stdout=subprocess.DEVNULL)
    base = peak = 0
    while probe.poll() is None:
        base = max(base, _hwm_kib(probe.pid))
        time.sleep(0.05)
    load = os.getloadavg()
    t0 = time.perf_counter()
    log = tempfile.TemporaryFile("w+")  # its progress lines (a pipe nobody reads while it runs could fill)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=log, text=True)
    finished = False
    while time.perf_counter() - t0 < max_seconds:
        peak = max(peak, _hwm_kib(proc.pid))
        if proc.poll() is not None:
            finished = proc.returncode == 0
            break
        time.sleep(1.0)
    else:
        proc.kill()
    proc.wait()
    log.seek(0)
    err = log.read()
    res = {"command": " ".join(["tqz"] + cmd[3:]), "finished": finished, "wall_s": round(time.perf_counter() - t0, 1),
           "max_seconds": max_seconds, "peak_mib": round(peak / 1024, 1), "interpreter_mib": round(base / 1024, 1),
           "peak_over_interpreter_mib": round((peak - base) / 1024, 1), "load_before": load,
           "load_after": os.getloadavg(), "last_progress": (err.strip().splitlines() or [""])[-1][-300:]}
    if finished:
        res["bytes"] = out.stat().st_size
        res["sha256"] = hashlib.sha256(out.read_bytes()).hexdigest()
    res["target_mib"] = 1.5e9 / 2**20
    res["within_target"] = finished and res["peak_over_interpreter_mib"] <= res["target_mib"]
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--phase", choices=["encode", "decode"])
    ap.add_argument("--src")
    ap.add_argument("--dst")
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--mode", default="tq", help="tq (data-free, 4 bits, tq_scope tensor) or uniform")
    ap.add_argument("--layers", type=int, default=CONFIG["layers"], help="model size (20: ~604M parameters)")
    ap.add_argument("--out", default=str(RESULTS / "scale.json"))
    ap.add_argument("--only-minilm", action="store_true", help="only the MiniLM part, merged into --out")
    ap.add_argument("--cli", action="store_true", help="only the command line's encode (tqz encode MODEL --bits 4, "
                    "tq_scope model): its peak RSS, merged into --out as cli_encode")
    ap.add_argument("--cli-seconds", type=float, default=7200, help="--cli: stop the encode after this long")
    args = ap.parse_args()
    if args.phase:
        run_phase(args)
        return
    if args.only_minilm:
        TMP.mkdir(parents=True, exist_ok=True)
        res = json.loads(Path(args.out).read_text()) if Path(args.out).exists() else {}
        res["minilm"] = minilm_speed()
        res["minilm"]["load_average"] = os.getloadavg()
        Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
        print(json.dumps(res["minilm"], indent=1))
        return
    cfg = dict(CONFIG, layers=args.layers)
    TMP.mkdir(parents=True, exist_ok=True)
    model = TMP / f"synthetic-{args.layers}L"
    info = generate(model, cfg)
    if args.cli:
        res = json.loads(Path(args.out).read_text()) if Path(args.out).exists() else {}
        res["cli_encode"] = {"parameters": info["parameters"], "layers": args.layers,
                             **cli_encode(model, TMP / f"scale-cli-{args.layers}L.tqz", 4.0, args.cli_seconds)}
        Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
        print(json.dumps(res["cli_encode"], indent=1))
        return
    size = sum(p.stat().st_size for p in model.glob("*.safetensors"))
    print(f"model: {info['parameters'] / 1e6:.1f}M parameters, {size / 1e9:.2f} GB bf16 safetensors "
          f"({'cached' if info['cached'] else 'generated in %ss' % info['generate_s']})", flush=True)
    rows = []
    res = {"model": {"parameters": info["parameters"], "safetensors_bytes": size, "config": cfg},
           "mode": args.mode, "cpus": os.cpu_count(), "runs": rows}
    for jobs in (1, 2):
        tqz = TMP / f"scale-j{jobs}.tqz"
        enc = child("encode", model, tqz, jobs, args.mode)
        rows.append({"phase": "encode", "jobs": jobs, **enc})
        print(f"encode jobs={jobs}: {enc}", flush=True)
    for jobs in (1, 2):
        dec = child("decode", TMP / "scale-j1.tqz", TMP / "scale-decoded", jobs, args.mode)
        rows.append({"phase": "decode", "jobs": jobs, **dec})
        print(f"decode jobs={jobs}: {dec}", flush=True)
    enc1, enc2 = rows[0], rows[1]
    res["identical_bytes_jobs1_jobs2"] = enc1["sha256"] == enc2["sha256"]
    res["bits_per_param"] = round(8 * enc1["bytes"] / info["parameters"], 3)
    res["speedup_encode_jobs2"] = round(enc1["wall_s"] / enc2["wall_s"], 2)
    res["speedup_decode_jobs2"] = round(rows[2]["wall_s"] / rows[3]["wall_s"], 2)
    res["relative_error"] = quality(model, TMP / "scale-decoded", ["model.layers.0.self_attn.q_proj.weight",
                                                                    "model.layers.0.mlp.down_proj.weight",
                                                                    "model.embed_tokens.weight"])
    res["peak_under_1GiB"] = all(r["tree_peak_mib"] < 1024 for r in rows)
    res["load_average_at_end"] = os.getloadavg()  # the machine may be shared: read speed-ups with it
    res["minilm"] = minilm_speed()
    Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    print(f"\n{'phase':<7} {'jobs':>4} {'wall s':>8} {'main MiB':>9} {'tree MiB':>9} {'bytes':>12}")
    for r in rows:
        print(f"{r['phase']:<7} {r['jobs']:>4} {r['wall_s']:>8.1f} {r['main_peak_mib']:>9.0f} "
              f"{r['tree_peak_mib']:>9.0f} {r.get('bytes', ''):>12}")
    print(f"bits/param {res['bits_per_param']}, jobs=2 bytes identical: {res['identical_bytes_jobs1_jobs2']}, "
          f"speed-up encode x{res['speedup_encode_jobs2']}, decode x{res['speedup_decode_jobs2']}, "
          f"relative error {res['relative_error']}, peak < 1 GiB: {res['peak_under_1GiB']}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
