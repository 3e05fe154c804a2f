"""Compact calibration statistics (issue 15): the size of MiniLM's statistics file in each
``Stats.save`` precision, and what each does to the encoder.

MiniLM is calibrated once (batches as benchmarks/rd.py's ``Context.calibration_batches``: the 128
calibration sentences in batches of 16); the statistics are saved in each precision, read back,
and the model is encoded with ``tqcodec.save(sd, path, stats=stats, bits=BITS, mode="tq")``
from each; the decoded weights are evaluated (``benchmarks/zoo/minilm.py``: mean cosine of the
sentence embeddings to the original's on 600 sentences). The reference is the in-memory
statistics (float64, as calibrate returns them).

    python benchmarks/stats_size.py                       # the default variants
    python benchmarks/stats_size.py --variants float64,compact --bits 3.6

Variants: a precision of ``Stats.save`` (float64, float32, float16, eig, compact), or
``compact:DIM:RANKDIV:MINRANK`` (compact with other thresholds). Results go to
``benchmarks/results/stats_size.json`` (and a table on standard output).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import tqcodec  # noqa: E402
from tqcodec.model import stats as stats_mod  # noqa: E402
from benchmarks.zoo import minilm  # noqa: E402

DEFAULT_VARIANTS = "float64,float32,compact"


def _set_compact(dim: int, div: int, min_rank: int) -> None:
    stats_mod.COMPACT_FULL_DIM, stats_mod.COMPACT_RANK_DIV, stats_mod.COMPACT_MIN_RANK = dim, div, min_rank


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default=DEFAULT_VARIANTS)
    ap.add_argument("--bits", type=float, default=3.6)
    ap.add_argument("--out", default=str(HERE / "results" / "stats_size.json"))
    ap.add_argument("--keep", default=None, help="folder to keep the statistics files in")
    args = ap.parse_args()

    ref = minilm.reference_state_dict()
    module = minilm.build_module()
    module.load_state_dict(ref, strict=True)
    sents = minilm.sentences()["calibration"]
    batches = [minilm.encode(sents[i:i + 16]) for i in range(0, len(sents), 16)]
    t0 = time.perf_counter()
    stats = tqcodec.calibrate(module, batches)
    calib_s = time.perf_counter() - t0
    print(f"calibrated in {calib_s:.1f} s", flush=True)
    model_bytes = os.path.getsize(os.path.join(minilm.model_dir(), "model.safetensors"))
    work = Path(args.keep or tempfile.mkdtemp(prefix="stats_size_"))
    work.mkdir(parents=True, exist_ok=True)
    defaults = (stats_mod.COMPACT_FULL_DIM, stats_mod.COMPACT_RANK_DIV, stats_mod.COMPACT_MIN_RANK)
    rows = []
    for variant in ["in-memory"] + args.variants.split(","):
        entry = {"variant": variant}
        if variant == "in-memory":
            used = stats
        else:
            parts = variant.split(":")
            precision = parts[0]
            if len(parts) == 4:
                _set_compact(*(int(p) for p in parts[1:]))
            path = work / f"stats-{variant.replace(':', '_')}.safetensors"
            if path.exists():
                path.unlink()
            t0 = time.perf_counter()
            stats.save(str(path), precision=precision)
            entry["save_s"] = time.perf_counter() - t0
            _set_compact(*defaults)
            entry["stats_bytes"] = path.stat().st_size
            used = tqcodec.Stats.load(str(path))
        tqz = work / f"minilm-{variant.replace(':', '_')}.tqz"
        if tqz.exists():
            tqz.unlink()
        t0 = time.perf_counter()
        tqcodec.save(ref, tqz, stats=used, bits=args.bits, mode="tq")
        entry["encode_s"] = time.perf_counter() - t0
        entry["tqz_bytes"] = tqz.stat().st_size
        res = minilm.evaluate(tqcodec.load(tqz), ref)
        entry["mean_cos"], entry["min_cos"] = res["value"], res["min_cos"]
        rows.append(entry)
        print(json.dumps(entry), flush=True)
    base = rows[0]["mean_cos"]
    out = {"bits": args.bits, "model_bytes": model_bytes, "calibration_s": calib_s, "results": rows}
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"\nMiniLM model.safetensors {model_bytes:,} B; tq --bits {args.bits}")
    print(f"{'statistics':<22} {'stats bytes':>13} {'tqz bytes':>11} {'mean cos':>9} {'vs in-memory':>12}")
    for r in rows:
        sb = f"{r['stats_bytes']:,}" if "stats_bytes" in r else "-"
        print(f"{r['variant']:<22} {sb:>13} {r['tqz_bytes']:>11,} {r['mean_cos']:>9.5f} {r['mean_cos'] - base:>+12.5f}")


if __name__ == "__main__":
    main()
