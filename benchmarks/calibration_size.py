"""How much calibration data is enough (issue 15): the smallest file that keeps the model transparent,
found by ``tqcodec.save(evaluate=..., threshold=...)``, with statistics from the first 32, 128 and
1024 calibration inputs.

    .venv/bin/python benchmarks/calibration_size.py [--models digits,minilm,codelm] [--samples 0,32,128,1024]

``0`` samples: no statistics (the data-free encoder), the floor calibration must never be worse
than; it is left out of the spread.

Digits: the first N images of the training split (``zoo.digits.calibration_inputs``). MiniLM: the
first N sentences of the benchmark's calibration pool (``zoo.minilm.calibration_pool``: the 128 of
``zoo/sentences.json`` that ``rd.py`` calibrates with, then 896 more from ``zoo/make_sentences.py``;
sample counts asked beyond the pool are skipped and said so). codelm: the first N windows of 128
tokens of its calibration files (``zoo.codelm.calibration_inputs``; 927 in all).
Both are disjoint from the evaluation inputs. MiniLM also as ``tqz calibrate --text POOL --samples N``
does it (``calibrate_folder``): the first N sentences run through the model, the tokens of all 1024
counted (a tokenizer reads far more text than the model can run). Each point is one rate search (``evaluate_search.run``:
the same search, evaluation and threshold) stopped once the passing file is within ``--tolerance``
(default 1%, finer than ``save``'s 3%) of the largest failing one, so the spread between sample
counts is measured to about that. NNCodec's smallest transparent file from ``results/rd.json`` is
beside each (its run's date given). Digits is also swept over ``rd.py``'s tq grid per sample count
(``SWEPT``), so that its smallest and stable points compare with NNCodec's of the same kind.
Writes ``results/calibration_size.json`` and ``.md``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.evaluate_search import RESULTS, rd_transparent, run, write_results  # noqa: E402
from benchmarks.zoo import codelm, minilm  # noqa: E402

POOL = {"minilm": lambda: len(minilm.calibration_pool()),  # how many calibration inputs there are (when asked)
        "codelm": lambda: len(codelm.calibration_inputs(None))}
# Digits' top-1 on 500 images passes or fails by one image, so its smallest passing file is partly
# luck; the same searches on the logit SQNR show what the calibration set itself changes. 34 dB:
# where rd.py's calibrated sweep (results/rd.json) became transparent for good (33.9 dB at 1.36
# bits/param, every larger point transparent). MiniLM's mean cosine is smooth already.
SMOOTH = {"digits": ("logit_sqnr_db", 34.0)}
COUNTED = {"minilm": (minilm.model_dir, minilm.calibration_pool)}  # a folder the tokenizer comes from, the text
# Digits also swept over rd.py's tq grid, as NNCodec's point in rd.json is: a search finds where
# the metric crosses the threshold, a sweep's smallest passing point can be one lucky image, so
# only sweeps compare with NNCodec's smallest point, and stable points with its stable one.
SWEPT = {"digits"}


def nncodec_point(model: str) -> dict:
    """NNCodec's smallest transparent point in results/rd.json (and its smallest stable one's
    bytes), with that run's start."""
    best, stable, started = rd_transparent(model, "nncodec")
    if not best:
        return {}
    return {"bytes": best["bytes"], "bits": best["bits_per_param"], "started": started,
            "stable_bytes": stable["bytes"] if stable else None}


def _vs(r: dict, ref: dict) -> str:
    """A search's file against NNCodec's smallest transparent one (``ref``), or "-" without it."""
    return f"{r['file_bytes'] / ref['bytes']:.2f}x" if ref else "-"


def _bits(r: dict) -> float:
    """The bits/param of a search's chosen file."""
    return r["trials"][r["chosen"]]["bits"]


def _point(p: Optional[dict]) -> str:
    """An rd.py sweep point as "bytes (bits/param)", or "-" without one."""
    return f"{p['bytes']:,} ({p['bits_per_param']:.2f})" if p else "-"


def _ratio(p: Optional[dict], ref_bytes: Optional[int]) -> str:
    """A sweep point's bytes over NNCodec's ``ref_bytes``, or "-" without either."""
    return f"{p['bytes'] / ref_bytes:.2f}x" if p and ref_bytes else "-"


def _table(results: dict, key: str, intro: str, head: list[str], row) -> list[str]:
    """The lines of one more table: ``intro``, then ``row(model, entry, nncodec, n, run)`` (its
    cells) for each run of each model's ``key`` entry; none when no model has one."""
    entries = {model: m[key] for model, m in results["models"].items() if m.get(key)}
    if not entries:
        return []
    lines = ["", intro, "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for model, entry in entries.items():
        ref = results["models"][model].get("nncodec", {})
        lines += ["| " + " | ".join(str(c) for c in row(model, entry, ref, n, r)) + " |"
                  for n, r in entry["runs"].items()]
    return lines


def write_md(results: dict, path: Path) -> None:
    lines = ["# How much calibration data is enough", "",
             "Generated by `benchmarks/calibration_size.py`: the smallest transparent tq file found by "
             "`save(evaluate=..., threshold=...)` with statistics from the first N calibration inputs; "
             "*spread*: the largest file over the smallest, minus 1 (each search stops once its passing file is "
             f"within {results.get('tolerance', 0.03):.0%} of its largest failing one).", "",
             "| model | samples | file bytes | bits/param | vs NNCodec | metric | trials | calibration s | "
             "search s | load avg |", "|---|---|---|---|---|---|---|---|---|---|"]
    for model, m in results["models"].items():
        ref = m.get("nncodec", {})
        for n, r in m["runs"].items():
            n = n if n != "0" else "0 (no statistics)"
            vs, bits = _vs(r, ref), _bits(r)
            lines.append(f"| {model} | {n} | {r['file_bytes']:,} | {bits:.3f} | {vs} | {r['file_metric']:.4f} | "
                         f"{len(r['trials'])} | {r['statistics_s']} | {r['search_s']} | "
                         f"{r['loadavg_1min'][0]:.2f}-{r['loadavg_1min'][1]:.2f} |")
    lines += _table(results, "smooth", "The same searches on a smooth measure (where the transparency metric "
                    "moves by single test inputs):",
                    ["model", "samples", "measure", "file bytes", "bits/param", "vs NNCodec", "value", "trials"],
                    lambda model, sm, ref, n, r: [model, n if n != "0" else "0 (no statistics)",
                                                  f"{sm['measure']} >= {sm['threshold']:g}", f"{r['file_bytes']:,}",
                                                  f"{_bits(r):.3f}", _vs(r, ref), f"{r['file_metric']:.2f}",
                                                  len(r["trials"])])
    lines += _table(results, "counted", "As `tqz calibrate --text POOL --samples N` makes them: the first N inputs "
                    "run, the tokens of the whole pool counted:",
                    ["model", "samples run", "tokens counted in", "file bytes", "bits/param", "vs NNCodec", "metric",
                     "trials", "calibration s"],
                    lambda model, c, ref, n, r: [model, n, c["pool"], f"{r['file_bytes']:,}", f"{_bits(r):.3f}",
                                                 _vs(r, ref), f"{r['file_metric']:.4f}", len(r["trials"]),
                                                 r["statistics_s"]])
    lines += _table(results, "swept", "Swept over rd.py's tq grid instead of searched (NNCodec's points are of its "
                    "own sweep in rd.json; *stable*: the smallest point from which every larger point of the sweep "
                    "is transparent):",
                    ["model", "samples", "smallest transparent, bytes (bits/param)", "vs NNCodec",
                     "stable, bytes (bits/param)", "vs NNCodec's stable", "points", "load avg"],
                    lambda model, sw, ref, n, r: [
                        model, n, _point(r["smallest_transparent"]),
                        _ratio(r["smallest_transparent"], ref.get("bytes")),
                        _point(r["smallest_stable_transparent"]),
                        _ratio(r["smallest_stable_transparent"], ref.get("stable_bytes")),
                        len(r["points"]), f"{r['loadavg'][0]:.2f}-{r['loadavg'][1]:.2f}"])
    lines.append("")
    for model, m in results["models"].items():
        if m.get("swept"):
            sw = m["swept"]
            lines.append(f"- {model}, swept: spread {sw['spread']:.1%} of the smallest points, "
                         f"{sw['stable_spread']:.1%} of the stable ones"
                         + (f"; NNCodec's stable point {m['nncodec']['stable_bytes']:,} B"
                            if m.get("nncodec", {}).get("stable_bytes") else ""))
        if m.get("counted"):
            lines.append(f"- {model}, tokens counted in all {m['counted']['pool']}: spread {m['counted']['spread']:.1%}")
        if m.get("smooth"):
            lines.append(f"- {model}, {m['smooth']['measure']} >= {m['smooth']['threshold']:g}: spread "
                         f"{m['smooth']['spread']:.1%}")
        ref = m.get("nncodec", {})
        lines.append(f"- {model}: spread {m['spread']:.1%} over {', '.join(n for n in m['runs'] if n != '0')} samples"
                     + (f"; NNCodec's smallest transparent file {ref['bytes']:,} B (rd.json run of {ref['started']})"
                        if ref else "") + (f"; {m['skipped']}" if m.get("skipped") else ""))
    path.write_text("\n".join(lines) + "\n")


def searches(model: str, counts: list[int], workdir: Path, args: argparse.Namespace,
             measure: Optional[tuple[str, float]] = None, counted_in: Optional[Path] = None) -> dict:
    """One search per sample count (``evaluate_search.run`` with the first N calibration inputs;
    ``measure``: as ``run``'s; ``counted_in``: a text file, one input a line, whose first N lines
    run and whose every line's tokens count, by ``calibrate_folder``), keyed by the count as a string."""
    from tqcodec.model.calibrate import calibrate_folder

    def make_stats(ctx, n):
        if not n:
            return None
        if counted_in is None:
            return ctx.calibrated(n)
        return calibrate_folder(COUNTED[model][0](), counted_in, samples=n)[0]

    runs = {}
    for n in counts:
        print(f"{model}, {n} samples" + (f", {measure[0]} >= {measure[1]}" if measure else "")
              + (", the tokens of every line counted" if counted_in else "") + ":", flush=True)
        r = run(model, f"calibrated, {n} samples" if n else "none", workdir, args,
                make_stats=lambda ctx, n=n: make_stats(ctx, n), measure=measure, tolerance=args.tolerance)
        r["measured"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        runs[str(n)] = r
        print(f"  {r['file_bytes']} bytes, {len(r['trials'])} trials, load {os.getloadavg()[0]:.1f}", flush=True)
    return runs


def sweeps(model: str, counts: list[int], workdir: Path) -> dict:
    """rd.py's sweep of tq over its grid for ``model``, once per sample count (statistics from
    the first N calibration inputs), keyed by the count as a string: each with rd.py's points,
    smallest and smallest stable transparent points."""
    from benchmarks import rd

    grid = next(c for c in rd.CODECS if c.name == "tq").sweeps[model]
    args = argparse.Namespace(workdir=str(workdir), minilm_quick=False)
    zoo = rd.MODELS[model]
    reference = zoo.reference_state_dict(workdir / f"{zoo.NAME}.pt")
    ctx = rd.Context(model, zoo, reference, workdir / f"{model}-reference.pt", workdir, args)
    runs = {}
    for n in counts:
        print(f"{model}, {n} samples, swept:", flush=True)
        stats = ctx.calibrated(n)
        codec = rd.tqcodec_codec(f"tq-{n}", f"tq, {n} samples", "bits", {model: grid},
                                 lambda v, stats=stats: {"bits": v, "stats": stats})
        entry = rd.sweep_model(model, [codec], args)["codecs"][codec.name]
        runs[str(n)] = {k: entry[k] for k in ("points", "smallest_transparent", "smallest_stable_transparent",
                                              "loadavg", "seconds")}
        runs[str(n)]["measured"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    return runs


def _point_spread(runs: dict, key: str) -> Optional[float]:
    """The largest over the smallest, minus 1, of the runs' ``key`` points' bytes."""
    sizes = [r[key]["bytes"] for r in runs.values() if r.get(key)]
    return max(sizes) / min(sizes) - 1.0 if sizes else None


def _ordered(runs: dict) -> dict:
    """Runs keyed by sample count, in increasing count."""
    return {n: runs[n] for n in sorted(runs, key=int)}


def _spread(runs: dict) -> Optional[float]:
    """The largest file over the smallest, minus 1, over the calibrated runs (not the data-free one)."""
    sizes = [r["file_bytes"] for n, r in runs.items() if n != "0"]
    return max(sizes) / min(sizes) - 1.0 if sizes else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="digits,minilm")
    ap.add_argument("--samples", default="0,32,128,1024")
    ap.add_argument("--tolerance", type=float, default=0.01,
                    help="each search stops within this fraction of its largest failing file (save's default: 0.03)")
    ap.add_argument("--out", default=str(RESULTS / "calibration_size.json"))
    args = ap.parse_args()
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.exists() else {"models": {}}
    if results.get("tolerance", 0.03) != args.tolerance:
        results["models"] = {}  # entries searched to another tolerance are not comparable
    results["tolerance"] = args.tolerance
    asked = [int(n) for n in args.samples.split(",")]
    with tempfile.TemporaryDirectory(prefix="calibration_size_") as tmp:
        for model in args.models.split(","):
            pool = POOL[model]() if model in POOL else None
            counts = [n for n in asked if pool is None or n <= pool]
            entry = {"nncodec": nncodec_point(model),
                     "skipped": (f"{[n for n in asked if n not in counts]} asked, the pool holds {pool}"
                                 if len(counts) < len(asked) else "")}
            # sample counts not asked this time keep their earlier searches (each says when it was measured)
            before = results["models"].get(model, {})
            entry["runs"] = _ordered({**before.get("runs", {}), **searches(model, counts, Path(tmp), args)})
            entry["spread"] = _spread(entry["runs"])
            if model in SMOOTH:
                key, threshold = SMOOTH[model]
                runs = _ordered({**before.get("smooth", {}).get("runs", {}),
                                 **searches(model, counts, Path(tmp), args, measure=(key, threshold))})
                entry["smooth"] = {"measure": key, "threshold": threshold, "runs": runs, "spread": _spread(runs)}
            calibrated = [n for n in counts if n]
            if model in COUNTED and calibrated:
                text = Path(tmp) / "pool.txt"
                pool_lines = COUNTED[model][1]()
                text.write_text("\n".join(pool_lines) + "\n", encoding="utf-8")
                runs = _ordered({**before.get("counted", {}).get("runs", {}),
                                 **searches(model, calibrated, Path(tmp), args, counted_in=text)})
                entry["counted"] = {"pool": len(pool_lines), "runs": runs, "spread": _spread(runs)}
            elif "counted" in before:  # not searched this time (only 0 samples asked): kept as measured
                entry["counted"] = before["counted"]
            if model in SWEPT and calibrated:
                runs = _ordered({**before.get("swept", {}).get("runs", {}), **sweeps(model, calibrated, Path(tmp))})
                entry["swept"] = {"runs": runs, "spread": _point_spread(runs, "smallest_transparent"),
                                  "stable_spread": _point_spread(runs, "smallest_stable_transparent")}
            elif "swept" in before:
                entry["swept"] = before["swept"]
            results["models"][model] = entry
    write_results(results, out, write_md)


if __name__ == "__main__":
    main()
