"""MiniLM run from its integer stage (``tqcodec.load_module(..., transform_domain=True)``) vs the
dense decode (issue 6, part 5, transform-domain half).

    .venv/bin/python benchmarks/transform_domain.py [--bits 4.0] [--tqz PATH] [--repeat 3]
        [--json benchmarks/results/transform_domain.json]

Needs the bench extras (``make bench-install``). Steps (each cached in ``benchmarks/results/tmp/``):

1. calibration statistics: ``tqcodec.calibrate`` on the reference MiniLM over the 128
   calibration sentences in batches of 16 (as ``rd.py``), ``minilm-stats.safetensors``
   (about 6 minutes on 2 cores);
2. the ``.tqz``: mode ``tq`` with those statistics at ``--bits`` bits per parameter
   (``minilm-tq-<bits>.tqz``);
3. three models from ``zoo.minilm.build_module()``: the original fp32 weights; the file loaded
   densely (``transform_domain=False``); the file loaded with ``transform_domain=True`` (every
   ``nn.Linear``/``nn.Embedding`` whose weight is ``tq``: a ``TQLinear``/``TQEmbedding`` holding
   int8/int16 levels).

Measured: resident weight memory (bytes of the parameters and buffers each model holds,
``tqcodec.nn.resident_bytes``; the swapped layers' share separately), the forward time of the
eval batch (the 600 evaluation sentences in length-sorted batches of 64, as ``minilm.embed``;
best of ``--repeat``, the two models alternating; also one batch of 64 of the longest sentences),
and the sentence-embedding cosine between the two models and of each to the original's.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "benchmarks"))

import torch  # noqa: E402

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


@torch.no_grad()
def forward_eval(model, batches) -> float:
    t0 = time.perf_counter()
    for inp in batches:
        model(**inp)
    return time.perf_counter() - t0


def eval_batches(sents):
    from zoo import minilm
    order = sorted(range(len(sents)), key=lambda i: (len(minilm.tokenizer().encode(sents[i]).ids), i))
    return [minilm.encode([sents[i] for i in order[b:b + minilm.BATCH]]) for b in range(0, len(order), minilm.BATCH)]


def cos_stats(a: torch.Tensor, b: torch.Tensor) -> dict:
    a64, b64 = a.double(), b.double()
    c = (a64 * b64).sum(1) / (a64.norm(dim=1) * b64.norm(dim=1))
    return {"mean_cos": c.mean().item(), "min_cos": c.min().item(),
            "max_abs_diff": (a - b).abs().max().item()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bits", type=float, default=4.0)
    ap.add_argument("--tqz", help="an existing MiniLM .tqz (default: encode it, mode tq with stats)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", default=os.path.join(REPO, "benchmarks", "results", "transform_domain.json"))
    args = ap.parse_args()
    from zoo import minilm

    path = args.tqz or tqz_path(args.bits)
    with tqcodec.open(path) as f:
        modes = {n: f.info(n).mode for n in f.keys()}
    orig = minilm.build_module()
    orig.load_state_dict(minilm.original_state_dict(), strict=True)
    t0 = time.perf_counter()
    dense = tqcodec.load_module(minilm.build_module(), path, transform_domain=False).eval()
    t_dense = time.perf_counter() - t0
    t0 = time.perf_counter()
    tdom = tqcodec.load_module(minilm.build_module(), path, transform_domain=True).eval()
    t_tdom = time.perf_counter() - t0
    swapped = {n: m for n, m in tdom.named_modules() if isinstance(m, tqnn._TQBase)}
    level_dtypes: dict = {}
    for m in swapped.values():
        for b in range(m.num_bands):
            lv = m._levels(b)
            key = str(lv.dtype).replace("torch.", "")
            level_dtypes[key] = level_dtypes.get(key, 0) + lv.numel()
    swapped_bytes = sum(tqnn.resident_bytes(m) for m in swapped.values())
    swapped_params = sum(math.prod(m.weight_shape) for m in swapped.values())
    kinds: dict = {}
    for m in swapped.values():
        kinds[type(m).__name__] = kinds.get(type(m).__name__, 0) + 1
    held = {"original_fp32": tqnn.resident_bytes(orig), "dense_decode": tqnn.resident_bytes(dense),
            "transform_domain": tqnn.resident_bytes(tdom), "swapped_layers_transform_domain": swapped_bytes,
            "swapped_layers_fp32": 4 * swapped_params + sum(4 * m.bias.numel() for m in swapped.values()
                                                            if m.bias is not None)}

    sents = minilm.sentences()["eval"]
    batches = eval_batches(sents)
    longest = batches[-1]
    torch.manual_seed(0)
    times = {"dense": [], "transform_domain": []}
    one = {"dense": [], "transform_domain": []}
    forward_eval(dense, batches[:1])  # warm up
    forward_eval(tdom, batches[:1])
    for _ in range(args.repeat):
        for key, model in (("dense", dense), ("transform_domain", tdom)):
            times[key].append(forward_eval(model, batches))
            one[key].append(forward_eval(model, [longest]))
    e_orig = minilm.embed(orig, sents)
    e_dense = minilm.embed(dense, sents)
    e_tdom = minilm.embed(tdom, sents)

    res = {"model": "MiniLM (all-MiniLM-L6-v2)", "file": os.path.relpath(path, REPO),
           "file_bytes": os.path.getsize(path), "bits_per_param": 8 * os.path.getsize(path) / sum(
               t.numel() for t in orig.state_dict().values()),
           "tensor_modes": {m: sum(1 for v in modes.values() if v == m) for m in sorted(set(modes.values()))},
           "swapped_layers": len(swapped), "swapped_kinds": kinds, "swapped_params": swapped_params, "level_elements_by_dtype": level_dtypes,
           "with_transform": sum(1 for m in swapped.values() if m.transform is not None),
           "resident_weight_bytes": held,
           "load_s": {"dense": t_dense, "transform_domain": t_tdom},
           "eval_batch": {"sentences": len(sents), "batches": len(batches), "batch": minilm.BATCH,
                          "longest_batch_shape": list(longest["input_ids"].shape)},
           "forward_eval_s": {k: min(v) for k, v in times.items()}, "forward_eval_s_all": times,
           "forward_longest_batch_s": {k: min(v) for k, v in one.items()},
           "embeddings": {"transform_domain_vs_dense": cos_stats(e_tdom, e_dense),
                          "dense_vs_original": cos_stats(e_dense, e_orig),
                          "transform_domain_vs_original": cos_stats(e_tdom, e_orig)},
           "torch": torch.__version__, "threads": torch.get_num_threads(), "python": platform.python_version(),
           "machine": platform.machine(), "cpus": os.cpu_count(), "loadavg": os.getloadavg()}
    report(res)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as fh:
            json.dump(res, fh, indent=1)
        print(f"wrote {args.json}")


def report(r: dict) -> None:
    h = r["resident_weight_bytes"]
    print(f"MiniLM {r['file']}: {r['file_bytes']} bytes ({r['bits_per_param']:.2f} bits/param), modes "
          f"{r['tensor_modes']}; {r['swapped_layers']} layers swapped {r['swapped_kinds']} ({r['swapped_params']} weights, levels "
          f"{r['level_elements_by_dtype']}, {r['with_transform']} with a transform)")
    print(f"resident weight memory: original fp32 {h['original_fp32'] / MIB:.2f} MiB, dense decode "
          f"{h['dense_decode'] / MIB:.2f} MiB, transform domain {h['transform_domain'] / MIB:.2f} MiB "
          f"(swapped layers {h['swapped_layers_transform_domain'] / MIB:.2f} MiB vs "
          f"{h['swapped_layers_fp32'] / MIB:.2f} MiB fp32)")
    fe, fl = r["forward_eval_s"], r["forward_longest_batch_s"]
    print(f"forward, {r['eval_batch']['sentences']} eval sentences: dense {fe['dense']:.3f} s, transform domain "
          f"{fe['transform_domain']:.3f} s ({fe['transform_domain'] / fe['dense']:.2f}x); longest batch "
          f"{r['eval_batch']['longest_batch_shape']} (sentences x tokens): {fl['dense']:.3f} s vs {fl['transform_domain']:.3f} s")
    for k, v in r["embeddings"].items():
        print(f"embeddings {k:<30} mean cos {v['mean_cos']:.9f}  min cos {v['min_cos']:.9f}  "
              f"max |diff| {v['max_abs_diff']:.3g}")


if __name__ == "__main__":
    main()
