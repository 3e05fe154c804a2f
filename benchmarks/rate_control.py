"""Rate control and encode time of mode ``tq`` on the two benchmark models (issue 4).

    python benchmarks/rate_control.py [--models digits,minilm] [--bits 2 3 4 6]

For each model: calibration (``tqcodec.calibrate`` on the benchmark's calibration batches,
timed), then for each target B a whole file ``tqcodec.save(sd, stats=..., bits=B, mode="tq")``
(timed) and data-free (no stats), the file's real bits per parameter, its deviation from B
(must be within ±3%), the model's metric and which tensors chose a transform. Times are wall
and CPU seconds of this process; the load average at start and end is recorded, since this
machine's 2 cores are shared. Writes ``benchmarks/results/rate_control.json`` and ``.md``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import tqcodec  # noqa: E402
from benchmarks.rd import MODELS, RESULTS, Context  # noqa: E402

TOLERANCE = 0.03


def _timed(fn):
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w0, time.process_time() - c0


def run_model(model: str, bits_list: list[float], args: argparse.Namespace) -> dict:
    zoo = MODELS[model]
    ref = zoo.reference_state_dict()
    ctx = Context(model, zoo, ref, Path(args.out) / 'tmp' / 'unused.pt', Path(args.out) / 'tmp', args)
    params = ctx.parameters
    module = zoo.build_module()
    module.load_state_dict(ref, strict=True)
    module.eval()
    batches = ctx.calibration_batches()
    stats, cal_wall, cal_cpu = _timed(lambda: tqcodec.calibrate(module, batches))
    print(f"{model}: calibrated in {cal_wall:.1f} s wall, {cal_cpu:.1f} s CPU", flush=True)
    rows = []
    for with_stats in (True, False):
        for bits in bits_list:
            opts = {"mode": "tq", "bits": bits, "stats": stats if with_stats else None}
            data, wall, cpu = _timed(lambda: tqcodec.encode_bytes(ref, **opts))
            res = zoo.evaluate(tqcodec.load(data), ref)
            f = tqcodec.open(data)
            transformed = [n for n in f.keys() if f.info(n).params.get("transform") == "float16"]
            actual = 8 * len(data) / params
            row = {"stats": with_stats, "bits_target": bits, "bytes": len(data), "bits_per_param": actual,
                   "deviation": actual / bits - 1.0, "within_3pct": abs(actual / bits - 1.0) <= TOLERANCE,
                   "metric": res["value"], "transparent": bool(zoo.is_transparent(res)),
                   "encode_wall_s": wall, "encode_cpu_s": cpu,
                   "with_calibration_wall_s": wall + (cal_wall if with_stats else 0.0),
                   "transformed_tensors": transformed}
            rows.append(row)
            print(f"  {'stats' if with_stats else 'data-free'} B={bits}: {len(data):,} B, {actual:.4f} b/p "
                  f"({100 * row['deviation']:+.2f}%), {res['metric']} {res['value']:.4f}, encode {wall:.1f} s "
                  f"(+calibration {row['with_calibration_wall_s']:.1f} s), transforms: {len(transformed)}",
                  flush=True)
    return {"parameters": params, "calibration_wall_s": cal_wall,
            "calibration_cpu_s": cal_cpu, "rows": rows}


def write_markdown(result: dict, path: Path) -> None:
    lines = ["# Rate control of mode tq (`benchmarks/rate_control.py`)", "",
             f"Run {result['started']} UTC on {result['machine']}; load average {result['loadavg_start']} at "
             f"start, {result['loadavg_end']} at end (2 cores; other work on the machine slows wall times).",
             f"Command: `{result['command']}`", ""]
    for model, m in result["models"].items():
        lines += [f"## {model} ({m['parameters']:,} parameters)", "",
                  f"Calibration: {m['calibration_wall_s']:.1f} s wall ({m['calibration_cpu_s']:.1f} s CPU).", "",
                  "| statistics | target bits/param | bytes | actual bits/param | deviation | metric | transparent "
                  "| encode s | encode + calibration s | tensors with a transform |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in m["rows"]:
            lines.append(f"| {'calibrated' if r['stats'] else 'data-free'} | {r['bits_target']} | {r['bytes']:,} | "
                         f"{r['bits_per_param']:.4f} | {100 * r['deviation']:+.2f}% | {r['metric']:.4f} | "
                         f"{'yes' if r['transparent'] else 'no'} | {r['encode_wall_s']:.1f} | "
                         f"{r['with_calibration_wall_s']:.1f} | {len(r['transformed_tensors'])} |")
        lines.append("")
    path.write_text("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="digits,minilm")
    ap.add_argument("--bits", type=float, nargs="+", default=[2.0, 3.0, 4.0, 6.0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    result = {"started": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
              "machine": f"{os.cpu_count()} CPUs, torch {torch.__version__}, tqcodec {tqcodec.__version__}",
              "command": "python benchmarks/rate_control.py " + " ".join(sys.argv[1:]),
              "loadavg_start": round(os.getloadavg()[0], 2), "models": {}}
    for model in args.models.split(","):
        result["models"][model] = run_model(model, args.bits, args)
    result["loadavg_end"] = round(os.getloadavg()[0], 2)
    result["all_within_3pct"] = all(r["within_3pct"] for m in result["models"].values() for r in m["rows"])
    out = Path(args.out)
    (out / "rate_control.json").write_text(json.dumps(result, indent=1))
    write_markdown(result, out / "rate_control.md")
    print(f"all within ±3%: {result['all_within_3pct']}; wrote {out / 'rate_control.md'}")


if __name__ == "__main__":
    main()
