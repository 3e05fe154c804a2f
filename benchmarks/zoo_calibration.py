"""Calibrated tq on the four small zoo models: what the statistics of every layer kind (issue 19)
do to the encoder. For each model: calibrate on its calibration inputs (batches of 64), encode with
``tqcodec.save(sd, path, stats=stats, bits=B, mode="tq")`` at a few rates, evaluate the decoded
weights (the model's own metric), and report which tensors had statistics of which kind.

Run it with the tqcodec to measure first on PYTHONPATH, e.g. the branch before and after:

    PYTHONPATH=/work/main python benchmarks/zoo_calibration.py --out before.json
    PYTHONPATH=/work/cal  python benchmarks/zoo_calibration.py --out after.json

Reference weights are trained (deterministically) or read from ``$TQ_ZOO_CACHE``.
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.append(str(HERE.parent))  # benchmarks.zoo; tqcodec comes from PYTHONPATH first

import tqcodec  # noqa: E402
from benchmarks.zoo import MODELS  # noqa: E402

BITS = {"digits-cnn": (1.0, 1.5, 2.0), "dwsep-cnn": (2.0, 3.0, 4.0), "seqrnn-lstm": (1.5, 2.0, 3.0),
        "conv-autoencoder": (1.5, 2.0, 3.0)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(BITS))
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    results = {"tqcodec": tqcodec.__file__, "models": {}}
    work = Path(tempfile.mkdtemp(prefix="zoo_calibration_"))
    for name in args.models.split(","):
        zoo = MODELS[name]
        ref = zoo.reference_state_dict()
        module = zoo.build_module()
        module.load_state_dict(ref, strict=True)
        x = zoo.calibration_inputs(512)
        t0 = time.perf_counter()
        stats = tqcodec.calibrate(module, [x[i:i + 64] for i in range(0, len(x), 64)])
        calib_s = time.perf_counter() - t0
        kinds = collections.Counter(stats.get(n).kind if n in stats else "none" for n in ref)
        entry = {"calibration_s": calib_s, "kinds": dict(kinds), "params": sum(t.numel() for t in ref.values()),
                 "points": []}
        for bits in BITS[name]:
            path = work / f"{name}-{bits}.tqz"
            tqcodec.save(ref, path, stats=stats, bits=bits, mode="tq")
            res = zoo.evaluate(tqcodec.load(path), ref)
            entry["points"].append({"bits": bits, "bytes": path.stat().st_size, "value": res["value"]})
            print(f"{name:<18} bits {bits:<4} {path.stat().st_size:>8} B  {zoo.METRIC} {res['value']:.4f}", flush=True)
        print(f"{name:<18} statistics: {dict(kinds)}  (calibration {calib_s:.1f} s)", flush=True)
        results["models"][name] = entry
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
