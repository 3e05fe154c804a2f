"""Where the bits go against NNCodec at equal distortion, tensor by tensor (issue 15, data-free).

    .venv/bin/python benchmarks/entropy_gap.py --nncodec-python /work/nnc-venv/bin/python
    .venv/bin/python benchmarks/entropy_gap.py --models digits          # digits only (~1 min)

For each tensor (digits-cnn: every weight of 2+ dims; MiniLM: one attention projection, one FFN
matrix and the word embedding), at the step NNCodec uses at its smallest transparent qp (digits
-26, MiniLM -33; step 2^(qp/4), which is tqcodec's step code qp, spec §7.1):

- NNCodec 2.1.3 on the tensor alone (``nnc.compress({name: w}, qp=QP)``, its defaults otherwise):
  bitstream bytes and MSE with dependent quantization (trellis, its default) and without
  (``use_dq=False``). Each per-tensor bitstream carries NNCodec's own headers (``overhead``: the
  bytes of a 1-element... measured as the bitstream of an all-zero tensor of the same shape).
- The same step, levels by rounding to nearest (tqcodec's data-free rounding): whether they are
  NNCodec's no-DQ levels, and their cost in tqcodec's format 1.2 (``tq`` record, one band: the
  real chunk and parameter bytes, table included), the zero-order empirical entropy, and the
  entropies a decoder could reach with contexts it knows (all computed on the [n, m] matrix view,
  rows = output channels, scanned row by row as both codecs scan it):

  * static, per context a table: ``H(X | C)`` (empirical, no table cost: a lower bound for a
    static coder with one table per context);
  * adaptive, binarized as DeepCABAC does (significance, sign, greater-than-1..K unary flags,
    exp-Golomb remainder in bypass bits), every flag's probability learnt from the counts so far
    (Krichevsky-Trofimov) in its context: what a context-adaptive coder pays, no table at all.

  Contexts: ``prev`` = min(|previous level in the row|, 2); ``above`` = min(|level above|, 2)
  (same column, previous row); ``prev+above``; ``prev2`` = min(|l[-1]| + |l[-2]|, 4);
  ``rowclass``/``colclass``: the row's (column's) mean |level| in 4 classes, signalled (2 bits
  per row or column counted).
- Equal MSE with NNCodec's trellis: the continuous step at which rounding to nearest has
  NNCodec-DQ's MSE, and the zero-order entropy + table there; so "trellis gain" = NNCodec no-DQ
  bytes at DQ's MSE (interpolated in log-MSE over qp) vs DQ bytes.

Writes ``results/entropy_gap.json`` and ``.md``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

QP = {"digits": -26, "minilm": -33}
MINILM_TENSORS = ["encoder.layer.0.attention.self.query.weight", "encoder.layer.3.intermediate.dense.weight",
                  "embeddings.word_embeddings.weight"]
K_GT = 10  # DeepCABAC's default cabac_unary_length_minus1 = 10
SAMPLE_ABOVE = 1 << 22  # context measures of larger tensors: 8 evenly spaced blocks of rows, 1/8 of the
SAMPLE_BLOCKS = 8       # rows in all, the bytes scaled by the share (the word embedding: 11.7 M levels)


# --- NNCodec side (run in NNCodec's venv) --------------------------------------------------------

def nnc_worker(npz_in: str, npz_out: str, qps: list[int]) -> None:
    import torch  # noqa: F401  (nncodec imports it)
    from nncodec_runner import import_nnc
    nnc = import_nnc()
    data = dict(np.load(npz_in))
    out, meta = {}, {}
    real_stdout = sys.stdout
    for name, w in data.items():
        for qp in qps:
            for dq in (True, False):
                with tempfile.TemporaryDirectory() as d:
                    path = os.path.join(d, "t.nnc")
                    sys.stdout = sys.stderr
                    try:
                        t0 = time.perf_counter()
                        bs = nnc.compress({name: w.astype(np.float32)}, path, qp=qp, use_dq=dq, return_bitstream=True)
                        dec = nnc.decompress(path)
                        sec = time.perf_counter() - t0
                        if qp == qps[0] and dq:
                            zs = nnc.compress({name: np.zeros_like(w, dtype=np.float32)}, path, qp=qp,
                                              use_dq=dq, return_bitstream=True)
                            meta[f"{name}|zero"] = len(zs)
                    finally:
                        sys.stdout = real_stdout
                key = f"{name}|{qp}|{int(dq)}"
                out[key] = np.asarray(dec[name], dtype=np.float32).reshape(w.shape)
                meta[key] = {"bytes": len(bs), "seconds": sec}
    np.savez(npz_out, **out)
    with open(npz_out + ".json", "w") as f:
        json.dump(meta, f)


def run_nncodec(python: str, tensors: dict, qps: list[int], tmp: Path) -> tuple[dict, dict]:
    src, dst = tmp / "in.npz", tmp / "out.npz"
    np.savez(src, **tensors)
    subprocess.run([python, str(Path(__file__).resolve()), "--nnc-worker", str(src), str(dst),
                    "--qps", *map(str, qps)], check=True, stdout=sys.stderr)
    return dict(np.load(dst)), json.load(open(str(dst) + ".json"))


# --- entropy measures ----------------------------------------------------------------------------

def h0_bits(levels: np.ndarray) -> float:
    flat = levels.reshape(-1)
    c = np.bincount(flat - flat.min())
    c = c[c > 0]
    return float(-(c * np.log2(c / flat.size)).sum())


def cond_bits(levels: np.ndarray, ctx: np.ndarray) -> float:
    """sum over contexts of n_c H(X | C = c): static coding with one (free) table per context."""
    x = levels.reshape(-1).astype(np.int64)
    c = ctx.reshape(-1).astype(np.int64)
    x = x - x.min()
    key = c * (int(x.max()) + 1) + x
    joint = np.bincount(key)
    marg = np.bincount(c)
    j = joint[joint > 0]
    m = marg[marg > 0]
    return float(-(j * np.log2(j)).sum() + (m * np.log2(m)).sum())


def adaptive_binary_bits(bits: np.ndarray, ctx: np.ndarray) -> float:
    """Code length of binary ``bits`` (in order), each context's probability learnt by KT
    (p(1) = (n1 + 1/2) / (n + 1)) from that context's earlier bits."""
    if bits.size == 0:
        return 0.0
    order = np.argsort(ctx, kind="stable")
    b, c = bits[order].astype(np.int64), ctx[order]
    start = np.r_[0, np.flatnonzero(np.diff(c)) + 1]
    seg = np.repeat(start, np.diff(np.r_[start, b.size]))
    idx = np.arange(b.size) - seg  # bits seen before in this context
    ones = np.cumsum(b) - b
    ones_before = ones - ones[seg]
    n1 = np.where(b == 1, ones_before, idx - ones_before)
    return float(-np.log2((n1 + 0.5) / (idx + 1.0)).sum())


def cabac_bits(levels: np.ndarray, ctx: np.ndarray, nctx: int) -> float:
    """DeepCABAC-like binarization, adaptive binary contexts: sig flag (ctx), sign flag (ctx),
    greater-than-k flags k = 1..K_GT (ctx x k), then the remainder |l| - K_GT - 1 in exp-Golomb
    order 0: its unary prefix bins adaptive (one context per bin index), its suffix bits bypass."""
    x = levels.reshape(-1).astype(np.int64)
    c = ctx.reshape(-1).astype(np.int64)
    a = np.abs(x)
    total = adaptive_binary_bits((a > 0).astype(np.int8), c)
    nz = a > 0
    total += adaptive_binary_bits((x[nz] < 0).astype(np.int8), c[nz])
    for k in range(1, K_GT + 1):
        sel = a >= k
        if not sel.any():
            break
        total += adaptive_binary_bits((a[sel] > k).astype(np.int8), c[sel] + nctx * k)
    rem = a[a > K_GT] - K_GT - 1
    if rem.size:
        k = np.floor(np.log2(rem + 1)).astype(np.int64)  # prefix: k ones and a zero; suffix: k bits
        for i in range(int(k.max()) + 1):
            sel = k >= i
            total += adaptive_binary_bits((k[sel] > i).astype(np.int8), np.zeros(int(sel.sum()), dtype=np.int64))
        total += float(k.sum())
    return total


def contexts(mat: np.ndarray) -> dict[str, tuple[np.ndarray, int, float]]:
    """Decoder-known contexts of the [n, m] levels: name -> (context per element, classes,
    side bits to signal it)."""
    a = np.abs(mat.astype(np.int64))
    n, m = a.shape
    flat = a.reshape(-1)
    prev = np.r_[0, flat[:-1]].reshape(n, m)
    prev[:, 0] = 0  # a row starts without a previous coefficient
    prev2 = np.r_[0, 0, flat[:-2]].reshape(n, m)
    prev2[:, :2] = 0
    above = np.vstack([np.zeros((1, m), dtype=np.int64), a[:-1]])
    p = np.minimum(prev, 2)
    ab = np.minimum(above, 2)
    out = {"none": (np.zeros_like(a), 1, 0.0), "prev": (p, 3, 0.0), "above": (ab, 3, 0.0),
           "prev+above": (3 * p + ab, 9, 0.0), "prev2": (np.minimum(prev + prev2, 4), 5, 0.0)}
    for name, axis, count in (("rowclass", 1, n), ("colclass", 0, m)):
        mean = a.mean(axis=axis)
        edges = np.quantile(mean, [0.25, 0.5, 0.75]) if mean.size > 3 else np.array([np.inf] * 3)
        cls = np.searchsorted(edges, mean, side="right")
        cls = cls[:, None] * np.ones((1, m), dtype=np.int64) if axis == 1 else np.ones((n, 1), dtype=np.int64) * cls[None, :]
        out[name] = (cls, 4, 2.0 * count)
    return out


def sample_rows(lv: np.ndarray) -> tuple[np.ndarray, float]:
    """``lv`` itself, or for a tensor above SAMPLE_ABOVE levels SAMPLE_BLOCKS evenly spaced blocks of
    consecutive rows (1/SAMPLE_BLOCKS of the rows), and the factor that scales their bytes up."""
    n = lv.shape[0]
    if lv.size <= SAMPLE_ABOVE or n < SAMPLE_BLOCKS ** 2:
        return lv, 1.0
    per = n // SAMPLE_BLOCKS ** 2
    starts = [n * b // SAMPLE_BLOCKS for b in range(SAMPLE_BLOCKS)]
    sub = np.concatenate([lv[s:s + per] for s in starts])
    return sub, lv.shape[0] / sub.shape[0]


# --- our side ------------------------------------------------------------------------------------

def tq_bytes(mat: np.ndarray, code: int) -> int:
    """Real bytes of a one-band tq record of ``mat`` at step ``code`` (chunks with headers,
    parameters with the table), as the encoder would store it (nearest rounding)."""
    from tqcodec.format.steps import steps_from_codes
    from tqcodec.modes.tq.format import write
    from tqcodec.pipeline.encode import stored_bytes
    step = float(steps_from_codes([code])[0])
    return stored_bytes(write([np.rint(mat / step).astype(np.int64)], [code]))


def equal_mse_step(w: np.ndarray, mse: float, lo: float, hi: float) -> float:
    """The step (between lo and hi) at which rounding to nearest has ``mse`` (bisection on log)."""
    for _ in range(50):
        mid = math.sqrt(lo * hi)
        e = w - np.rint(w / mid) * mid
        if float(np.mean(e * e)) > mse:
            hi = mid
        else:
            lo = mid
    return math.sqrt(lo * hi)


def table_overhead_bits(levels: np.ndarray) -> float:
    from tqcodec.modes.tq.allocation import table_bits
    flat = levels.reshape(-1)
    return float(table_bits(np.bincount(flat - flat.min())))


def analyse(name: str, w: np.ndarray, qp: int, nnc: dict, meta: dict) -> dict:
    from tqcodec.format.steps import steps_from_codes
    mat = w.reshape(w.shape[0], -1).astype(np.float64)
    step = float(steps_from_codes([qp])[0])
    n_el = mat.size
    lv = np.rint(mat / step).astype(np.int64)
    mse_round = float(np.mean((mat - lv * step) ** 2))
    row = {"tensor": name, "shape": list(w.shape), "elements": n_el, "qp": qp, "step": step}
    for dq in (1, 0):
        key = f"{name}|{qp}|{dq}"
        dec = nnc[key].reshape(mat.shape).astype(np.float64)
        row[f"nnc_dq{dq}_bytes"] = meta[key]["bytes"]
        row[f"nnc_dq{dq}_mse"] = float(np.mean((mat - dec) ** 2))
        if dq == 0:
            nlv = np.rint(dec / step).astype(np.int64)
            row["nnc_dq0_levels_on_grid"] = bool(np.allclose(nlv * step, dec, atol=1e-7 * step))
            row["nnc_dq0_levels_equal_nearest"] = float(np.mean(nlv == lv))
        else:
            # DQ reconstructs on the half-step grid (two quantizers): report the share on it
            half = np.rint(dec / (step / 2))
            row["nnc_dq1_on_half_grid"] = bool(np.allclose(half * step / 2, dec, atol=1e-6 * step))
    row["nnc_header_bytes"] = meta.get(f"{name}|zero")
    row["round_mse"] = mse_round
    row["tq_bytes"] = tq_bytes(mat, qp)
    row["h0_bytes"] = h0_bits(lv) / 8
    row["table_bytes"] = table_overhead_bits(lv) / 8
    sub, scale = sample_rows(lv)
    row["context_rows_share"] = 1.0 / scale
    ctxs = contexts(sub)
    base = (h0_bits(sub) + table_overhead_bits(sub)) * scale / 8
    row["sampled_h0_table_bytes"] = base
    row["static_ctx_bytes"] = {k: scale * (cond_bits(sub, c) + side) / 8 for k, (c, nc, side) in ctxs.items()}
    row["adaptive_ctx_bytes"] = {k: scale * (cabac_bits(sub, c, nc) + side) / 8 for k, (c, nc, side) in ctxs.items()}
    # equal MSE with NNCodec's trellis: nearest rounding at the step with DQ's MSE
    s_eq = equal_mse_step(mat, row["nnc_dq1_mse"], step / 8, step * 2)
    lv_eq = np.rint(mat / s_eq).astype(np.int64)
    row["eq_mse_step_ratio"] = s_eq / step
    row["eq_mse_h0_table_bytes"] = (h0_bits(lv_eq) + table_overhead_bits(lv_eq)) / 8
    sub_eq, scale = sample_rows(lv_eq)
    row["eq_mse_adaptive_best_bytes"] = min(scale * (cabac_bits(sub_eq, c, nc) + side) / 8 for k, (c, nc, side)
                                            in contexts(sub_eq).items())
    return row


def model_tensors(model: str) -> dict[str, np.ndarray]:
    if model == "minilm":
        from zoo import minilm
        sd = minilm.original_state_dict()
        return {k: sd[k].float().numpy() for k in MINILM_TENSORS}
    from zoo import digits
    sd = digits.reference_state_dict()
    return {k: v.float().numpy() for k, v in sd.items() if v.is_floating_point() and v.dim() >= 2}


def fmt(x: float) -> str:
    return f"{x:,.0f}"


def report(rows: list[dict], load: list) -> str:
    lines = ["# Where the bits go: tqcodec vs NNCodec at NNCodec's step (data-free)", "",
             "Generated by `benchmarks/entropy_gap.py` (see its docstring). Bytes per tensor; NNCodec "
             "per-tensor bitstreams include its headers (`hdr`: the bitstream of an all-zero tensor of the "
             "same shape at the same qp, the floor of its side cost). `tq 1.2`: a one-band tq record of the "
             "nearest-rounded levels at the same step, real chunk + parameter bytes (table included). "
             "`H0`: zero-order empirical entropy of those levels; `+table`: with the LEB128 table bytes. "
             f"1-min load average at start/end: {load[0]:.2f} / {load[-1]:.2f}.", "",
             "## Same step, same levels (rounding to nearest = NNCodec without DQ)", "",
             "| tensor | elements | qp | NNCodec DQ | NNCodec no-DQ (hdr) | no-DQ levels = ours | tq 1.2 | H0 | table | "
             "tq 1.2 / NNCodec no-DQ | MSE DQ / MSE round |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['tensor']} | {r['elements']:,} | {r['qp']} | {fmt(r['nnc_dq1_bytes'])} | "
                     f"{fmt(r['nnc_dq0_bytes'])} ({r['nnc_header_bytes']}) | {r['nnc_dq0_levels_equal_nearest']:.4f} | "
                     f"{fmt(r['tq_bytes'])} | {fmt(r['h0_bytes'])} | {fmt(r['table_bytes'])} | "
                     f"{r['tq_bytes'] / r['nnc_dq0_bytes']:.3f} | {r['nnc_dq1_mse'] / r['round_mse']:.3f} |")
    for model in dict.fromkeys(r["model"] for r in rows):
        mr = [r for r in rows if r["model"] == model]
        tot = {k: sum(r[k] for r in mr) for k in ("nnc_dq1_bytes", "nnc_dq0_bytes", "tq_bytes", "h0_bytes", "table_bytes")}
        lines.append(f"| **sum, {model}** | {sum(r['elements'] for r in mr):,} | | {fmt(tot['nnc_dq1_bytes'])} | "
                     f"{fmt(tot['nnc_dq0_bytes'])} | | {fmt(tot['tq_bytes'])} | {fmt(tot['h0_bytes'])} | "
                     f"{fmt(tot['table_bytes'])} | {tot['tq_bytes'] / tot['nnc_dq0_bytes']:.3f} | |")
    names = list(rows[0]["static_ctx_bytes"])
    lines += ["", "## Contexts a decoder knows: bytes of the same levels", "",
              "Static = empirical conditional entropy H(X|C), one free table per context (a lower bound for "
              "static tables; real tables cost more). Adaptive = DeepCABAC-like binarization with every flag "
              "learnt in its context (KT counts), no table: what a context-adaptive coder pays. `rowclass`/"
              "`colclass` include 2 bits per row/column to signal the class. Percentages: against H0 + table "
              "(the static one-table cost of format 1.2 without chunk/parameter overhead). Tensors above 2^22 levels "
              "(the word embedding): measured on 8 evenly spaced blocks of rows, 1/8 of them, scaled up.", "",
              "| tensor | H0+table | " + " | ".join(f"static {k}" for k in names) + " | "
              + " | ".join(f"adaptive {k}" for k in names) + " |",
              "|---" * (2 + 2 * len(names)) + "|"]
    for model in dict.fromkeys(r["model"] for r in rows):
        sums = {("s", k): 0.0 for k in names} | {("a", k): 0.0 for k in names}
        base_sum = 0.0
        for r in (r for r in rows if r["model"] == model):
            base = r["sampled_h0_table_bytes"]
            base_sum += base
            cells = []
            for kind, d in (("s", r["static_ctx_bytes"]), ("a", r["adaptive_ctx_bytes"])):
                for k in names:
                    sums[(kind, k)] += d[k]
                    cells.append(f"{fmt(d[k])} ({100 * (d[k] / base - 1):+.1f}%)")
            lines.append(f"| {r['tensor']} | {fmt(base)} | " + " | ".join(cells) + " |")
        lines.append(f"| **sum, {model}** | {fmt(base_sum)} | " + " | ".join(
            f"{fmt(sums[(kind, k)])} ({100 * (sums[(kind, k)] / base_sum - 1):+.1f}%)"
            for kind in ("s", "a") for k in names) + " |")
    lines += ["", "## Rounding: NNCodec's trellis (DQ) at equal MSE", "",
              "`step ratio`: the step at which rounding to nearest has DQ's MSE, over NNCodec's step. "
              "`ours at DQ's MSE`: zero-order entropy + table of those levels (static, format 1.2), and the "
              "best adaptive context of the table above on them.", "",
              "| tensor | NNCodec DQ bytes | step ratio | ours at DQ's MSE: H0+table | ours: best adaptive ctx | "
              "DQ gain vs our static (%) |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['tensor']} | {fmt(r['nnc_dq1_bytes'])} | {r['eq_mse_step_ratio']:.3f} | "
                     f"{fmt(r['eq_mse_h0_table_bytes'])} | {fmt(r['eq_mse_adaptive_best_bytes'])} | "
                     f"{100 * (1 - r['nnc_dq1_bytes'] / r['eq_mse_h0_table_bytes']):.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nnc-worker", nargs=2, metavar=("IN", "OUT"), help=argparse.SUPPRESS)
    ap.add_argument("--qps", type=int, nargs="+", help=argparse.SUPPRESS)
    ap.add_argument("--models", default="digits,minilm")
    ap.add_argument("--nncodec-python", default="/work/nnc-venv/bin/python")
    ap.add_argument("--out", default=str(HERE / "results" / "entropy_gap"))
    ap.add_argument("--merge", action="store_true", help="keep the rows of other models from OUT.json")
    ap.add_argument("--report-only", action="store_true", help="rewrite OUT.md from OUT.json")
    args = ap.parse_args()
    if args.nnc_worker:
        return nnc_worker(*args.nnc_worker, args.qps)
    if args.report_only:
        old = json.loads(Path(args.out).with_suffix(".json").read_text())
        Path(args.out).with_suffix(".md").write_text(report(old["rows"], old["load_avg_1min"]))
        return None
    load = [os.getloadavg()[0]]
    rows = []
    t0 = time.time()
    for model in args.models.split(","):
        tensors = model_tensors(model)
        with tempfile.TemporaryDirectory() as d:
            nnc, meta = run_nncodec(args.nncodec_python, tensors, [QP[model]], Path(d))
        for name, w in tensors.items():
            r = analyse(name, w, QP[model], nnc, meta)
            r["model"] = model
            rows.append(r)
            print(json.dumps({k: v for k, v in r.items() if not isinstance(v, dict)}), file=sys.stderr)
    load.append(os.getloadavg()[0])
    out = Path(args.out)
    if args.merge and out.with_suffix(".json").exists():
        old = json.loads(out.with_suffix(".json").read_text())
        run = set(args.models.split(","))
        rows = [r for r in old["rows"] if r["model"] not in run] + rows
        load = old["load_avg_1min"] + load
    out.with_suffix(".json").write_text(json.dumps({"rows": rows, "load_avg_1min": load,
                                                    "seconds": time.time() - t0}, indent=1))
    out.with_suffix(".md").write_text(report(rows, load))
    print(f"wrote {out}.json, .md")


if __name__ == "__main__":
    main()
