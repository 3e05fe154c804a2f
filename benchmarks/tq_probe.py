"""Probe the tq coding mode: the smallest whole file that stays transparent, tq with and without
calibration statistics, on the zoo models (benchmarks/zoo). NNCodec's measured anchors are
quoted from ../shared/design/findings.md (re-measured by benchmarks/rd.py, not here).

    python -m benchmarks.tq_probe --model digits-cnn [--bits 0.8 1.0 1.2] [--json out.json]
    python -m benchmarks.tq_probe --model minilm --bits 3.0 3.5 4.0
"""
from __future__ import annotations

import argparse
import json
import time

import torch

import tqcodec

NNCODEC = {"digits-cnn": 15_747, "minilm": 14_516_762}  # bytes at the transparent point (findings.md)


def _zoo(name: str):
    if name == "digits-cnn":
        from .zoo import digits as z
    else:
        from .zoo import minilm as z
    return z


def _batches(z, name: str, n: int, batch: int):
    x = z.calibration_inputs(n)
    if isinstance(x, dict):
        return [{k: v[i:i + batch] for k, v in x.items()} for i in range(0, n, batch)]
    return [x[i:i + batch] for i in range(0, len(x), batch)]


def run(name: str, bits_list: list[float], n_calib: int, batch: int, data_free: bool,
        sens_batches: int, sens_samples: int) -> list[dict]:
    z = _zoo(name)
    ref = z.reference_state_dict()
    params = sum(v.numel() for v in ref.values())
    module = z.build_module()
    module.load_state_dict(ref)
    module.eval()
    t0 = time.time()
    stats = tqcodec.calibrate(module, _batches(z, name, n_calib, batch), sensitivity_batches=sens_batches,
                              sensitivity_samples=sens_samples)
    t_cal = time.time() - t0
    rows = []
    for use_stats in ([True, False] if data_free else [True]):
        for bits in bits_list:
            t0 = time.time()
            data = tqcodec.encode_bytes(ref, stats=stats if use_stats else None, mode="tq", bits=bits)
            t_enc = time.time() - t0
            res = z.evaluate(tqcodec.load(data), ref)
            row = {"model": name, "stats": use_stats, "bits_target": bits, "bytes": len(data),
                   "bits_per_param": 8 * len(data) / params, "metric": res["value"],
                   "transparent": bool(z.is_transparent(res)), "encode_s": round(t_enc, 2),
                   "calibrate_s": round(t_cal, 2) if use_stats else 0.0,
                   "vs_nncodec": len(data) / NNCODEC[name]}
            rows.append(row)
            print(json.dumps(row), flush=True)
    for use_stats in (True, False):
        ok = [r for r in rows if r["stats"] == use_stats and r["transparent"]]
        if ok:
            best = min(ok, key=lambda r: r["bytes"])
            print(f"smallest transparent ({'stats' if use_stats else 'data-free'}): {best['bytes']} B "
                  f"({best['bits_per_param']:.3f} bits/param, metric {best['metric']:.4f}), "
                  f"{best['vs_nncodec']:.3f}x NNCodec's {NNCODEC[name]} B")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="digits-cnn", choices=["digits-cnn", "minilm"])
    ap.add_argument("--bits", type=float, nargs="+", default=None)
    ap.add_argument("--calib", type=int, default=None, help="calibration inputs")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--sens-batches", type=int, default=None)
    ap.add_argument("--sens-samples", type=int, default=None)
    ap.add_argument("--data-free", action="store_true", help="also sweep tq without statistics")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    if a.model == "digits-cnn":
        bits = a.bits or [0.95, 1.0, 1.05, 1.1, 1.15, 1.2]
        n, b, sb, ss = a.calib or 1297, a.batch or 64, a.sens_batches or 8, a.sens_samples or 64
    else:
        bits = a.bits or [3.6, 3.7, 3.8, 3.9]
        n, b, sb, ss = a.calib or 128, a.batch or 32, a.sens_batches or 1, a.sens_samples or 16
    torch.set_num_threads(2)
    rows = run(a.model, bits, n, b, a.data_free, sb, ss)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
