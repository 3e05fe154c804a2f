"""MiniLM and small MLPs run from their integer stage (``tqcodec.load_module(...,
transform_domain=True)``) vs the dense decode: latency at batch 1 and 32, resident weight memory
(issue 6 part 5; issue 16, fast transform-domain layers).

    .venv/bin/python benchmarks/transform_domain.py [--bits 4.0] [--tqz PATH] [--repeat 5]
        [--threads 1,2] [--baseline REV] [--json benchmarks/results/transform_domain.json]

Needs the bench extras (``make bench-install``). Steps (each cached in ``benchmarks/results/tmp/``):

1. calibration statistics: ``tqcodec.calibrate`` on the reference MiniLM over the 128
   calibration sentences in batches of 16 (as ``rd.py``), ``minilm-stats.safetensors``;
2. the ``.tqz``: mode ``tq`` with those statistics at ``--bits`` bits per parameter
   (``minilm-tq-<bits>.tqz``);
3. models from ``zoo.minilm.build_module()``: the original fp32 weights; the file loaded
   densely (``transform_domain=False``); the file loaded with ``transform_domain=True`` (every
   ``nn.Linear``/``nn.Embedding`` whose weight is ``tq``: a ``TQLinear``/``TQEmbedding`` holding
   int8/int16 levels); with ``--baseline REV`` also the file loaded by ``tqcodec/model/nn.py`` as
   it was at git revision REV (e.g. the layers before issue 16), as a third contender.

Measured, for each ``--threads`` setting (``torch.set_num_threads``):

- MiniLM latency at **batch 1**: 48 evaluation sentences spread over the length range (every
  12th of the 600 sorted by token count), one forward each; and at **batch 32**: the 600
  evaluation sentences sorted by token count in 19 batches of 32. Each round times every
  contender once on each set, the order reversed every other round (ABBA), ``--repeat`` rounds;
  reported: the best and the median total per contender and, as the ratio to the dense model, the
  median over rounds of the within-round ratio (robust to the load drifting between rounds) and
  the ratio of the bests. The load average (``os.getloadavg()``) is recorded every round.
- small MLPs (data-free ``tq`` at 4 bits/param, 8 row bands per big layer): 256-512-512-10 and
  the test suite's 24-48-40-10, 50 forward passes at batch 1 and at batch 64, the same rounds,
  for each ``--threads`` setting.

On a shared machine whose load average is near or above its core count, two threads per
process are oversubscribed: every parallel region (a matmul, and the two element-wise passes
that widen a layer's coefficients) may wait a scheduler slice for its second thread, so
``threads=2`` timings spread widely and say more about the load than about the layers; the
``threads=1`` rounds are the steadier comparison there.

Also: resident weight memory (bytes of the parameters and buffers each model holds,
``tqcodec.model.nn.resident_bytes``), the transient shared scratch buffer after the runs
(``scratch_bytes``: the widened coefficients of the largest layer, per thread and compute
dtype), and the sentence-embedding cosine between the models and to the original.
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "benchmarks"))

import torch  # noqa: E402
from torch import nn  # noqa: E402

import tqcodec  # noqa: E402
from tqcodec.model import nn as tqnn  # noqa: E402

TMP = os.path.join(REPO, "benchmarks", "results", "tmp")
MIB = 1 << 20


def stats_path() -> str:
    from zoo import minilm
    path = os.path.join(TMP, "minilm-stats.safetensors")
    if not os.path.exists(path):
        module = minilm.build_module()
        module.load_state_dict(minilm.original_state_dict(), strict=True)
        sents = minilm.sentences()["calibration"]
        batches = [minilm.encode(sents[i:i + 16]) for i in range(0, len(sents), 16)]
        t0 = time.perf_counter()
        st = tqcodec.calibrate(module, batches)
        os.makedirs(TMP, exist_ok=True)
        st.save(path + ".part")
        os.replace(path + ".part", path)
        print(f"calibrated in {time.perf_counter() - t0:.0f} s -> {path}", file=sys.stderr)
    return path


def tqz_path(bits: float) -> str:
    from zoo import minilm
    path = os.path.join(TMP, f"minilm-tq-{bits}.tqz")
    if not os.path.exists(path):
        st = tqcodec.Stats.load(stats_path())
        t0 = time.perf_counter()
        tqcodec.save(minilm.original_state_dict(), path + ".part", mode="tq", stats=st, bits=bits)
        os.replace(path + ".part", path)
        print(f"encoded in {time.perf_counter() - t0:.0f} s -> {path}", file=sys.stderr)
    return path


def baseline_module(rev: str):
    """``tqcodec/model/nn.py`` as it was at git revision ``rev``, imported inside the package."""
    src = subprocess.run(["git", "-C", REPO, "show", f"{rev}:tqcodec/model/nn.py"], check=True,
                         capture_output=True, text=True).stdout
    name = "tqcodec.model._nn_baseline"
    spec = importlib.util.spec_from_loader(name, loader=None)
    mod = importlib.util.module_from_spec(spec)
    mod.__package__ = "tqcodec.model"
    sys.modules[name] = mod
    exec(compile(src, f"{rev}:tqcodec/model/nn.py", "exec"), mod.__dict__)  # noqa: S102 - our own file
    return mod


def load(build, path: str, how: str, base=None):
    if how == "dense":
        return tqcodec.load_module(build(), path, transform_domain=False).eval()
    if how == "baseline":
        return base.load_module(build(), path).eval()
    return tqcodec.load_module(build(), path, transform_domain=True).eval()


@torch.no_grad()
def run_all(model, batches) -> float:
    t0 = time.perf_counter()
    for inp in batches:
        if isinstance(inp, dict):
            model(**inp)
        else:
            model(inp)
    return time.perf_counter() - t0


def rounds(models: dict, sets: dict, repeat: int) -> dict:
    """``repeat`` rounds; each times every model on every set, the model order reversed every
    other round. -> {set: {model: [seconds per round]}, "loadavg": [per round]}."""
    names = list(models)
    out: dict = {k: {n: [] for n in names} for k in sets}
    out["loadavg"] = []
    for name in names:  # warm up
        for batches in sets.values():
            run_all(models[name], batches[:1])
    for r in range(repeat):
        order = names if r % 2 == 0 else names[::-1]
        for key, batches in sets.items():
            for name in order:
                out[key][name].append(run_all(models[name], batches))
        out["loadavg"].append(list(os.getloadavg()))
    return out


def summarise(times: dict, per: int) -> dict:
    """best/median totals, per item (``per`` items in the set), ratios to "dense"."""
    d = times["dense"]
    res = {}
    for name, v in times.items():
        res[name] = {"best_s": min(v), "median_s": statistics.median(v), "all_s": v,
                     "best_ms_per_item": 1e3 * min(v) / per, "median_ms_per_item": 1e3 * statistics.median(v) / per}
        if name != "dense":
            res[name]["ratio_to_dense_median_of_rounds"] = statistics.median(a / b for a, b in zip(v, d))
            res[name]["ratio_to_dense_best"] = min(v) / min(d)
    return res


class MLP(nn.Module):
    def __init__(self, dims):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i + 1 < len(self.layers):
                x = torch.relu(x)
        return x


MLPS = {"mlp-256-512-512-10": (256, 512, 512, 10), "mlp-24-48-40-10": (24, 48, 40, 10)}


def mlp_bench(contenders: list, base, repeat: int, passes: int = 50) -> dict:
    out = {}
    for name, dims in MLPS.items():
        torch.manual_seed(0)
        ref = MLP(dims).eval()
        path = os.path.join(TMP, f"{name}-tq-4.0.tqz")
        os.makedirs(TMP, exist_ok=True)
        tqcodec.save(ref.state_dict(), path, mode="tq", bits=4.0)
        models = {how: load(lambda: copy.deepcopy(ref), path, how, base) for how in contenders}
        layers = [m for m in models["transform_domain"].modules() if isinstance(m, tqnn._TQBase)]
        sets = {f"batch{b}": [torch.randn(b, dims[0])] * passes for b in (1, 64)}
        with torch.no_grad():
            x = sets["batch64"][0]
            identical = all(torch.equal(models[h](x), models["dense"](x)) for h in contenders)
        t = rounds(models, sets, repeat)
        out[name] = {"dims": list(dims), "bands_per_layer": [m.num_bands for m in layers],
                     "forward_passes": passes, "outputs_bit_identical_to_dense": identical,
                     "resident_weight_bytes": {h: tqnn.resident_bytes(m) for h, m in models.items()},
                     **{k: summarise(t[k], passes) for k in sets}, "loadavg_per_round": t["loadavg"]}
    return out


def cos_stats(a: torch.Tensor, b: torch.Tensor) -> dict:
    a64, b64 = a.double(), b.double()
    c = (a64 * b64).sum(1) / (a64.norm(dim=1) * b64.norm(dim=1))
    return {"mean_cos": c.mean().item(), "min_cos": c.min().item(),
            "max_abs_diff": (a - b).abs().max().item()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bits", type=float, default=4.0)
    ap.add_argument("--tqz", help="an existing MiniLM .tqz (default: encode it, mode tq with stats)")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", default="1,2", help="torch.set_num_threads settings, comma-separated")
    ap.add_argument("--baseline", help="a git revision: also run tqcodec/model/nn.py as it was there")
    ap.add_argument("--json", default=os.path.join(REPO, "benchmarks", "results", "transform_domain.json"))
    args = ap.parse_args()
    from zoo import minilm

    base = baseline_module(args.baseline) if args.baseline else None
    contenders = ["dense", "transform_domain"] + (["baseline"] if base else [])
    path = args.tqz or tqz_path(args.bits)
    with tqcodec.open(path) as f:
        modes = {n: f.info(n).mode for n in f.keys()}
    orig = minilm.build_module()
    orig.load_state_dict(minilm.original_state_dict(), strict=True)
    load_s, models = {}, {}
    for how in contenders:
        t0 = time.perf_counter()
        models[how] = load(minilm.build_module, path, how, base)
        load_s[how] = time.perf_counter() - t0
    tdom = models["transform_domain"]
    swapped = {n: m for n, m in tdom.named_modules() if isinstance(m, tqnn._TQBase)}
    level_dtypes: dict = {}
    for m in swapped.values():
        for b in range(m.num_bands):
            lv = m._levels(b)
            key = str(lv.dtype).replace("torch.", "")
            level_dtypes[key] = level_dtypes.get(key, 0) + lv.numel()
    swapped_params = sum(math.prod(m.weight_shape) for m in swapped.values())
    kinds: dict = {}
    for m in swapped.values():
        kinds[type(m).__name__] = kinds.get(type(m).__name__, 0) + 1

    sents = minilm.sentences()["eval"]
    order = sorted(range(len(sents)), key=lambda i: (len(minilm.tokenizer().encode(sents[i]).ids), i))
    one = [minilm.encode([sents[i]]) for i in order[::12]]
    b32 = [minilm.encode([sents[i] for i in order[b:b + 32]]) for b in range(0, len(order), 32)]
    with torch.no_grad():
        out = {h: models[h](**b32[-1]).last_hidden_state for h in contenders}
    identical = {h: torch.equal(out[h], out["dense"]) for h in contenders if h != "dense"}

    tqnn.release_scratch()
    timing = {}
    threads_before = torch.get_num_threads()
    for nt in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(nt)
        t = rounds(models, {"batch1": one, "batch32": b32}, args.repeat)
        timing[f"threads={nt}"] = {
            "batch1": {"sentences": len(one), **summarise(t["batch1"], len(one))},
            "batch32": {"sentences": len(sents), "batches": len(b32), **summarise(t["batch32"], len(sents))},
            "loadavg_per_round": t["loadavg"]}
    scratch = tqnn.scratch_bytes()
    held = {"original_fp32": tqnn.resident_bytes(orig), "dense_decode": tqnn.resident_bytes(models["dense"]),
            "transform_domain": tqnn.resident_bytes(tdom),
            "swapped_layers_transform_domain": sum(tqnn.resident_bytes(m) for m in swapped.values()),
            "swapped_layers_fp32": 4 * swapped_params + sum(4 * m.bias.numel() for m in swapped.values()
                                                            if m.bias is not None),
            "scratch_buffer_after_runs": scratch}
    if base:
        held["baseline"] = tqnn.resident_bytes(models["baseline"])
    held["transform_domain_over_fp32"] = held["transform_domain"] / held["original_fp32"]
    held["transform_domain_plus_scratch_over_fp32"] = (held["transform_domain"] + scratch) / held["original_fp32"]

    mlp = {}
    for nt in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(nt)
        mlp[f"threads={nt}"] = mlp_bench(contenders, base, args.repeat)
    torch.set_num_threads(threads_before)

    e_orig = minilm.embed(orig, sents)
    e = {h: minilm.embed(models[h], sents) for h in contenders}
    res = {"model": "MiniLM (all-MiniLM-L6-v2)", "file": os.path.relpath(path, REPO),
           "file_bytes": os.path.getsize(path), "bits_per_param": 8 * os.path.getsize(path) / sum(
               t.numel() for t in orig.state_dict().values()),
           "tensor_modes": {m: sum(1 for v in modes.values() if v == m) for m in sorted(set(modes.values()))},
           "swapped_layers": len(swapped), "swapped_kinds": kinds, "swapped_params": swapped_params,
           "level_elements_by_dtype": level_dtypes,
           "with_transform": sum(1 for m in swapped.values() if m.transform is not None),
           "contenders": contenders, "baseline_revision": args.baseline,
           "resident_weight_bytes": held, "load_s": load_s,
           "latency": timing, "last_hidden_state_bit_identical_to_dense": identical,
           "small_mlps": mlp,
           "embeddings": {**{f"{h}_vs_dense": cos_stats(e[h], e["dense"]) for h in contenders if h != "dense"},
                          **{f"{h}_vs_original": cos_stats(e[h], e_orig) for h in contenders}},
           "torch": torch.__version__, "python": platform.python_version(),
           "machine": platform.machine(), "cpus": os.cpu_count(), "loadavg_end": list(os.getloadavg()),
           "date": time.strftime("%Y-%m-%d %H:%M")}
    report(res)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as fh:
            json.dump(res, fh, indent=1)
        print(f"wrote {args.json}")


def report(r: dict) -> None:
    h = r["resident_weight_bytes"]
    print(f"MiniLM {r['file']}: {r['file_bytes']} bytes ({r['bits_per_param']:.2f} bits/param), modes "
          f"{r['tensor_modes']}; {r['swapped_layers']} layers swapped {r['swapped_kinds']} ({r['swapped_params']} "
          f"weights, levels {r['level_elements_by_dtype']}, {r['with_transform']} with a transform)")
    print(f"resident weight memory: original fp32 {h['original_fp32'] / MIB:.2f} MiB, dense decode "
          f"{h['dense_decode'] / MIB:.2f} MiB, transform domain {h['transform_domain'] / MIB:.2f} MiB "
          f"({h['transform_domain_over_fp32']:.3f}x fp32; swapped layers "
          f"{h['swapped_layers_transform_domain'] / MIB:.2f} MiB vs {h['swapped_layers_fp32'] / MIB:.2f} MiB fp32); "
          f"shared scratch buffer {h['scratch_buffer_after_runs'] / MIB:.2f} MiB "
          f"(with it {h['transform_domain_plus_scratch_over_fp32']:.3f}x fp32)")
    print(f"last hidden state bit-identical to the dense decode: {r['last_hidden_state_bit_identical_to_dense']}")
    for th, t in r["latency"].items():
        for key in ("batch1", "batch32"):
            v = t[key]
            parts = [f"{h} {v[h]['median_ms_per_item']:.2f} ms/sentence (best {v[h]['best_ms_per_item']:.2f})"
                     + (f" = {v[h]['ratio_to_dense_median_of_rounds']:.2f}x dense (bests "
                        f"{v[h]['ratio_to_dense_best']:.2f}x)" if h != "dense" else "")
                     for h in r["contenders"]]
            print(f"MiniLM {th} {key}: " + "; ".join(parts))
        print(f"  load average per round: {[round(x[0], 2) for x in t['loadavg_per_round']]}")
    for th, mlps in r["small_mlps"].items():
        for name, m in mlps.items():
            for key in ("batch1", "batch64"):
                v = m[key]
                parts = [f"{h} {v[h]['median_s']:.4f} s" + (f" = {v[h]['ratio_to_dense_median_of_rounds']:.2f}x"
                                                             if h != "dense" else "") for h in r["contenders"]]
                print(f"{name} {th} {key}, {m['forward_passes']} passes: " + "; ".join(parts))
            print(f"  load average per round: {[round(x[0], 2) for x in m['loadavg_per_round']]}")
    for k, v in r["embeddings"].items():
        print(f"embeddings {k:<30} mean cos {v['mean_cos']:.9f}  min cos {v['min_cos']:.9f}  "
              f"max |diff| {v['max_abs_diff']:.3g}")


if __name__ == "__main__":
    main()
