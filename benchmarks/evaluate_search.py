"""The smallest file that keeps a metric (issue 15): ``tqcodec.save(evaluate=..., threshold=...)``
on the benchmark models, against the smallest transparent file of ``benchmarks/rd.py``'s sweep.

    .venv/bin/python benchmarks/evaluate_search.py [--models digits,minilm] [--statistics calibrated]

For each model: statistics (``--statistics``): ``calibrated`` from the model's calibration inputs
(as ``rd.py`` makes them), ``synthetic`` from inputs the codec makes itself (MiniLM:
``tqcodec.model.calibrate.calibrate_folder`` of the model's Hugging Face folder, its default
number of seeded synthetic token sequences (512), as ``tqz calibrate`` without ``--text``; digits:
1024 standard normal images), or ``none`` (data-free); then one search with the model's fixed
evaluation as ``evaluate`` and its transparency threshold, then one plain encode at the rate the
search chose (``bits=``), the cost of "one encode" the search is compared with. Reports the
trials, the chosen file, the search's wall time over the one encode's (calibration excluded from
both: it is made once either way), and the ratio of the chosen file to the smallest transparent
point of the same codec in ``results/rd.json`` (``tq`` calibrated or ``tq-datafree``; the sweep's
date is reported beside it). Peak RSS and the load average are recorded. Writes ``results/evaluate_search.json`` and
``.md`` (``--merge`` keeps other models' entries).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import tqcodec  # noqa: E402
from benchmarks.rd import MODELS, Context  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_results(results: dict, out: Path, write_md: Callable[[dict, Path], None]) -> str:
    """``results`` written to ``out`` (JSON) and, by ``write_md``, beside it as ``.md``; returns
    the ``.md`` text."""
    out.write_text(json.dumps(results, indent=1) + "\n")
    md = out.with_suffix(".md")
    write_md(results, md)
    return md.read_text()


def synthetic_stats(model: str, zoo, ref: dict):
    """Statistics from inputs the codec makes (no data): see the module docstring."""
    import torch
    if model == "minilm":
        from tqcodec.model.calibrate import calibrate_folder
        return calibrate_folder(zoo.model_dir(), seed=0)[0]
    module = zoo.build_module()
    module.load_state_dict(ref)
    module.eval()
    shape = zoo.calibration_inputs(1).shape[1:]
    g = torch.Generator().manual_seed(0)
    return tqcodec.calibrate(module, [torch.randn(64, *shape, generator=g) for _ in range(16)])


def run(model: str, statistics: str, workdir: Path, args: argparse.Namespace,
        make_stats: Optional[Callable[[Context], Any]] = None, measure: Optional[tuple[str, float]] = None,
        tolerance: Optional[float] = None) -> dict:
    """One search on ``model`` with the ``statistics`` named (``make_stats(ctx)``, when given, makes
    them instead: ``calibration_size.py``'s subsets of the calibration inputs). ``measure``: (a
    key of the model's evaluation, its threshold) to search on instead of the transparency metric;
    ``tolerance``: the search's (``save``'s default when None)."""
    zoo = MODELS[model]
    ref = zoo.reference_state_dict()
    ctx = Context(model, zoo, ref, workdir / f"{model}.pt", workdir, args)
    data_free = statistics == "none"
    t0 = time.perf_counter()
    if make_stats is not None:
        stats = make_stats(ctx)
    else:
        stats = None if data_free else ctx.stats() if statistics == "calibrated" else synthetic_stats(model, zoo, ref)
    statistics_s = time.perf_counter() - t0
    evaluations = []
    key, threshold = measure or ("value", zoo.TRANSPARENT)

    def evaluate(path: str) -> float:
        t0 = time.perf_counter()
        value = zoo.evaluate(tqcodec.load(path), ref)[key]
        evaluations.append(time.perf_counter() - t0)
        return value

    load_before = os.getloadavg()[0]
    out = workdir / f"{model}-search.tqz"
    t0 = time.perf_counter()
    size = tqcodec.save(ref, out, stats=stats, evaluate=evaluate, threshold=threshold, overwrite=True,
                        tolerance=tolerance,
                        progress=lambda what, d, t: print(f"  {what}", flush=True) if what.startswith("search") else None)
    search_s = time.perf_counter() - t0
    with tqcodec.open(out) as f:
        log = f.metadata["tqz.search"]
    chosen = log["trials"][log["chosen"]]
    t0 = time.perf_counter()
    one = tqcodec.save(ref, workdir / f"{model}-one.tqz", stats=stats, bits=chosen["bits"], overwrite=True)
    one_s = time.perf_counter() - t0
    final_value = zoo.evaluate(tqcodec.load(out), ref)[key]
    res = {"model": model, "statistics": statistics, "parameters": ctx.parameters, "threshold": threshold,
           "measure": key,
           "statistics_s": round(statistics_s, 2), "trials": log["trials"], "chosen": log["chosen"],
           "file_bytes": size, "file_metric": final_value, "search_s": round(search_s, 2),
           "evaluations_s": round(sum(evaluations), 2), "one_encode_s": round(one_s, 2), "one_encode_bytes": one,
           "search_over_one_encode": round(search_s / one_s, 2), "loadavg_1min": [load_before, os.getloadavg()[0]],
           "peak_rss_mb": round(peak_rss_mb())}
    res["rd_codec"] = "tq-datafree" if data_free else "tq"
    best, stable, started = rd_transparent(model, res["rd_codec"])
    if best:
        res["rd_sweep"] = {"started": started, "bytes": best["bytes"], "bits": best["bits"]}
        res["vs_rd_sweep"] = round(size / best["bytes"], 4)
    if stable:
        res["rd_sweep_stable"] = {"bytes": stable["bytes"], "bits": stable["bits"]}
        res["vs_rd_sweep_stable"] = round(size / stable["bytes"], 4)
    return res


def rd_smallest_transparent(model: str, codec: str) -> tuple[Optional[dict], Optional[str]]:
    """``codec``'s smallest transparent point on ``model`` in ``results/rd.json`` (None when there is
    none, or no file), and the start of that file's run."""
    best, _, started = rd_transparent(model, codec)
    return best, started


def rd_transparent(model: str, codec: str) -> tuple[Optional[dict], Optional[dict], Optional[str]]:
    """From one read of ``results/rd.json``: ``codec``'s smallest transparent point on ``model``,
    its smallest *stable* one (from which every larger point of the sweep is transparent:
    ``rd.summarize``), each None when there is none (or no file), and the start of its run."""
    from benchmarks.rd import summarize
    rd_path = RESULTS / "rd.json"
    if not rd_path.exists():
        return None, None, None
    rd = json.loads(rd_path.read_text())
    entry = rd.get("models", {}).get(model, {}).get("codecs", {}).get(codec, {})
    points = entry.get("points")
    stable = summarize(points)["smallest_stable_transparent"] if points else None
    return entry.get("smallest_transparent"), stable, rd.get("started")


def write_md(results: dict, path: Path) -> None:
    lines = ["# The smallest file that keeps a metric: `save(evaluate=..., threshold=...)`", "",
             "Generated by `benchmarks/evaluate_search.py`. *vs sweep*: the chosen file over the smallest transparent "
             "point of tq calibrated (tq data-free for data-free runs) in `results/rd.json` (its sweep's start date "
             "beside it); *vs stable*: over the sweep's smallest stable transparent point, from which every larger "
             "point of the sweep is transparent (where one test image decides, single points are noise). *search / one "
             "encode*: the search's wall time (trials and evaluations included) over one plain encode at the "
             "chosen rate; calibration excluded from both.", "",
             "| model | statistics | trials | chosen bits | file bytes | metric (threshold) | vs sweep | vs stable | "
             "search s | one encode s | search / one encode | evaluations s | load avg | peak RSS MB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for key, r in results["runs"].items():
        sweep = (f"{r['vs_rd_sweep']}x ({r['rd_sweep']['bytes']:,} B, {r['rd_sweep']['started']})"
                 if "vs_rd_sweep" in r else "no sweep")
        stable = (f"{r['vs_rd_sweep_stable']}x ({r['rd_sweep_stable']['bytes']:,} B)" if "vs_rd_sweep_stable" in r
                  else "-")
        lines.append(f"| {r['model']} | {r['statistics']} | {len(r['trials'])} | "
                     f"{r['trials'][r['chosen']]['bits']:.3f} | {r['file_bytes']:,} | {r['file_metric']:.4f} "
                     f"({r['threshold']}) | {sweep} | {stable} | {r['search_s']} | {r['one_encode_s']} | "
                     f"{r['search_over_one_encode']}x | {r['evaluations_s']} | "
                     f"{r['loadavg_1min'][0]:.2f}-{r['loadavg_1min'][1]:.2f} | {r['peak_rss_mb']} |")
    lines += ["", "Trials (bits/param, bytes, metric, pass):", ""]
    for key, r in results["runs"].items():
        lines.append(f"- {key}: " + "; ".join(f"{t['bits']:.3f}, {t['size']:,}, {t['metric']:.4f}, "
                                               f"{'pass' if t['passed'] else 'fail'}" for t in r["trials"]))
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="digits,minilm")
    ap.add_argument("--statistics", choices=("calibrated", "synthetic", "none"), default="calibrated")
    ap.add_argument("--merge", action="store_true", help="keep the other entries of an existing result")
    ap.add_argument("--out", default=str(RESULTS / "evaluate_search.json"))
    args = ap.parse_args()
    out = Path(args.out)
    results = json.loads(out.read_text()) if args.merge and out.exists() else {"runs": {}}
    with tempfile.TemporaryDirectory(prefix="evaluate_search_") as tmp:
        for model in args.models.split(","):
            print(f"{model}:", flush=True)
            r = run(model, args.statistics, Path(tmp), args)
            r["measured"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
            results["runs"][f"{model}, {args.statistics}"] = r
            print(f"  {len(r['trials'])} trials, {r['file_bytes']} bytes, {r['search_s']} s "
                  f"({r['search_over_one_encode']}x one encode)", flush=True)
    write_results(results, out, write_md)


if __name__ == "__main__":
    main()
