"""Rate-distortion sweep: tqcodec's lossy options against NNCodec on the benchmark zoo.

    python benchmarks/rd.py [--nncodec-python /work/nnc-venv/bin/python]
                            [--models digits,dwsep,seqrnn,autoenc,minilm,codelm]
                            [--codecs nncodec,uniform-channel,uniform-tensor] [--minilm-quick]

For each model (``benchmarks/zoo``: digits-cnn, dwsep-cnn, seqrnn-lstm, conv-autoencoder,
minilm, codelm-gpt2) and each codec in ``CODECS``, every setting of the codec's sweep is encoded from the
reference weights, decoded, and evaluated with the model's fixed evaluation. Rate is the size of
the whole file (the .tqz file, or NNCodec's whole bitstream) over the number of parameters (every
value of the state dict, BatchNorm buffers included). For each codec the smallest transparent
point is reported (each zoo module's ``TRANSPARENT``); the metric need not be monotonic in the
setting, so every point is listed, and the "more rate never hurts" table shows, per codec, whether
every point from its smallest transparent one up to 8 bits/param is transparent too.

Writes ``benchmarks/results/rd.json`` (every point), ``rd.md`` (tables) and ``rd.png``
(bits/param vs metric). Intermediate files go to ``benchmarks/results/tmp/`` (git-ignored).

NNCodec runs in its own venv (see ``benchmarks/nncodec_runner.py``); without
``--nncodec-python`` it is skipped. A codec is one entry of ``CODECS``: a name, the parameter it
sweeps, its default sweep per model, and a function that encodes and decodes a list of settings.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import tqcodec  # noqa: E402
from benchmarks.zoo import MODELS as ZOO  # noqa: E402
from benchmarks.zoo import digits, minilm  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
# short names (the --models keys and the sweeps' keys) -> zoo modules, imported when used
MODEL_NAMES = {"digits": "digits-cnn", "dwsep": "dwsep-cnn", "seqrnn": "seqrnn-lstm",
               "autoenc": "conv-autoencoder", "minilm": "minilm", "codelm": "codelm-gpt2"}


class _ShortNames(dict):
    """``MODELS[short]``: the zoo module of a short model name (imported on first use)."""

    def __missing__(self, short: str):
        return ZOO[MODEL_NAMES[short]]


MODELS = _ShortNames()
MONOTONE_UP_TO = 8.0  # the "more rate never hurts" table: points from the smallest transparent up to this bits/param
# Equal-quality table: a classifier's top-1 passes or fails by single test images, so the smallest
# transparent point is partly a draw; its logit SQNR moves smoothly with the rate. Per codec,
# log2(bytes) is fitted by a quadratic in the SQNR over its points within FIT_MARGIN_DB of these
# levels' range, and the bytes at each level compared with NNCodec's fit.
EQUAL_QUALITY_DB = (20.0, 25.0, 30.0, 35.0)
FIT_MARGIN_DB = 6.0


# --- context: one model ----------------------------------------------------------------------

@dataclass
class Context:
    """What a codec needs to know about the model being swept."""

    model: str  # key of MODELS
    zoo: Any  # the benchmarks.zoo module
    reference: dict  # the reference state_dict
    reference_path: Path  # the same, saved as .pt (for codecs run in another process)
    workdir: Path
    args: argparse.Namespace
    _stats: Any = None
    calibration_s: float = 0.0

    @property
    def parameters(self) -> int:
        return sum(v.numel() for v in self.reference.values())

    def calibration_batches(self, samples: Optional[int] = None) -> list:
        """Calibration inputs (disjoint from the evaluation inputs), as a list of batches:
        tensors for digits (call ``module(batch)``), dicts for MiniLM (``module(**batch)``).
        ``samples``: the first that many of them (default: MiniLM's 128 sentences, 1024 digits
        images, 128 token windows for codelm, 512 for the other models; MiniLM's pool holds 1024,
        ``minilm.calibration_pool``)."""
        if self.model == "minilm":
            sents = minilm.calibration_pool()[:samples or 128]
            return [minilm.encode(sents[i:i + 16]) for i in range(0, len(sents), 16)]
        x = self.zoo.calibration_inputs(samples or {"digits": 1024, "codelm": 128}.get(self.model, 512))
        return [x[i:i + 64] for i in range(0, len(x), 64)]

    def calibrated(self, samples: Optional[int] = None):
        """``tqcodec.calibrate(module, batches)`` on the reference weights (``samples``: as
        :meth:`calibration_batches`)."""
        module = self.zoo.build_module()
        keys = module.load_state_dict(self.reference, strict=False)
        if keys.unexpected_keys or set(keys.missing_keys) - set(getattr(self.zoo, "TIED", ())):
            raise ValueError(f"{self.model}: the reference does not fit the module: {keys}")
        module.eval()
        t0 = time.perf_counter()
        stats = tqcodec.calibrate(module, self.calibration_batches(samples))
        self.calibration_s = time.perf_counter() - t0
        print(f"  calibrated in {self.calibration_s:.1f} s", flush=True)
        return stats

    def stats(self):
        """:meth:`calibrated` with every calibration input, computed once."""
        if self._stats is None:
            self._stats = self.calibrated()
        return self._stats


# --- codecs -----------------------------------------------------------------------------------

@dataclass
class Codec:
    """One entry of the sweep.

    ``run(ctx, values)`` yields, for each setting, a dict with ``value``, ``bytes`` (the whole
    file), ``encode_s``, ``decode_s`` and ``decoded`` (the decoded state_dict).
    """

    name: str
    label: str
    param: str
    sweeps: dict  # model -> default list of settings
    run: Callable[[Context, list], Any]
    available: Callable[[argparse.Namespace], Optional[str]] = lambda args: None  # None or why not
    extra: dict = field(default_factory=dict)


def tqcodec_codec(name: str, label: str, param: str, sweeps: dict, options: Callable[[Any], dict],
                  calibrated: bool = False, available=lambda args: None,
                  prepare: Callable[[dict], dict] = lambda sd: sd) -> Codec:
    """A codec that is a call of ``tqcodec.save(prepare(sd), path, **options(value))``; with
    ``calibrated``, ``stats=ctx.stats()`` is passed too and ``encode_s`` includes the
    calibration (computed once per model, its time added to every point)."""

    def run(ctx: Context, values: list):
        source = prepare(ctx.reference)
        for v in values:
            path = ctx.workdir / f"{ctx.model}-{name}-{v}.tqz"
            opts = dict(options(v))
            if calibrated:
                opts["stats"] = ctx.stats()
            t0 = time.perf_counter()
            size = tqcodec.save(source, path, overwrite=True, **opts)
            enc_s = time.perf_counter() - t0 + (ctx.calibration_s if calibrated else 0.0)
            t0 = time.perf_counter()
            decoded = tqcodec.load(path)
            dec_s = time.perf_counter() - t0
            assert size == path.stat().st_size
            yield {"value": v, "bytes": size, "encode_s": enc_s, "decode_s": dec_s, "decoded": decoded,
                   "options": {k: o for k, o in opts.items() if k != "stats"}}

    return Codec(name, label, param, sweeps, run, available, {"calibrated": calibrated})


FINETUNE_STEPS = {"digits": 300, "minilm": 40}  # the other models: no fine-tuning sweep


def _finetune_data(ctx: Context) -> tuple[list, Callable]:
    """Batches and loss of the fine-tuning: digits, cross-entropy on the training split; MiniLM,
    distillation (squared error of the mean-pooled token states, padding left out) to the
    reference model on the calibration sentences (disjoint from the evaluation ones)."""
    import torch.nn.functional as F
    if ctx.model == "digits":
        x, y = digits.train_data()
        return [(x[i:i + 64], y[i:i + 64]) for i in range(0, len(x), 64)], \
            lambda module, b: F.cross_entropy(module(b[0]), b[1])
    teacher = ctx.zoo.build_module()
    teacher.load_state_dict(ctx.reference, strict=True)
    teacher.eval()

    def pooled(module, inp):
        h = module(**inp).last_hidden_state
        m = inp["attention_mask"].unsqueeze(-1).to(h.dtype)
        return (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
    batches = []
    for inp in ctx.calibration_batches():
        with torch.no_grad():
            batches.append((inp, pooled(teacher, inp)))
    return batches, lambda module, b: F.mse_loss(pooled(module, b[0]), b[1])


def _tq_finetuned_run(ctx: Context, values: list):
    """Calibrated tq at ``bits``, then ``tqcodec.finetune`` (FINETUNE_STEPS steps, seed 0) to a
    file at the same rate; encode_s includes calibration, encoding and fine-tuning."""
    batches, loss = _finetune_data(ctx)
    for v in values:
        src = ctx.workdir / f"{ctx.model}-tq-{v}.tqz"
        out = ctx.workdir / f"{ctx.model}-tq-finetuned-{v}.tqz"
        t0 = time.perf_counter()
        tqcodec.save(ctx.reference, src, mode="tq", stats=ctx.stats(), bits=v, overwrite=True)
        module = ctx.zoo.build_module()
        module.load_state_dict(ctx.reference, strict=True)
        tqcodec.finetune(module, src, batches, loss, out=out, steps=FINETUNE_STEPS[ctx.model], seed=0,
                         stats=ctx.stats())
        enc_s = time.perf_counter() - t0 + ctx.calibration_s
        t0 = time.perf_counter()
        decoded = tqcodec.load(out)
        yield {"value": v, "bytes": out.stat().st_size, "encode_s": enc_s,
               "decode_s": time.perf_counter() - t0, "decoded": decoded,
               "options": {"mode": "tq", "bits": v, "finetune_steps": FINETUNE_STEPS[ctx.model]}}


def _nncodec_run(ctx: Context, values: list):
    """All qp values in one process of NNCodec's venv (the input is loaded once)."""
    cmd = [ctx.args.nncodec_python, str(ROOT / "benchmarks" / "nncodec_runner.py"), str(ctx.reference_path),
           "--qp", *map(str, values),
           "--bitstream", str(ctx.workdir / f"{ctx.model}-nncodec-{{qp}}.nnc"),
           "--decoded", str(ctx.workdir / f"{ctx.model}-nncodec-{{qp}}.pt")]
    log = open(ctx.workdir / f"{ctx.model}-nncodec.log", "w")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True)
    try:
        for line in proc.stdout:
            r = json.loads(line)
            decoded = torch.load(r["decoded"], map_location="cpu", weights_only=True)
            os.remove(r["decoded"])  # 90 MB each on MiniLM; the bitstream stays
            yield {"value": r["qp"], "bytes": r["bytes"], "encode_s": r["encode_s"], "decode_s": r["decode_s"],
                   "decoded": decoded, "options": {"qp": r["qp"]}}
    finally:
        rc = proc.wait()
        log.close()
    if rc != 0:
        raise RuntimeError(f"nncodec_runner failed ({rc}); see {log.name}")


def _nncodec_available(args) -> Optional[str]:
    if not args.nncodec_python:
        return "no --nncodec-python given"
    if not Path(args.nncodec_python).exists():
        return f"{args.nncodec_python} does not exist"
    return None


def _tq_available(args) -> Optional[str]:
    return None if hasattr(tqcodec, "calibrate") else "this tqcodec has no calibrate()/mode 'tq' yet"


SMALL_SNR = {m: list(range(14, 45, 2)) for m in ("dwsep", "seqrnn", "autoenc", "codelm")}

# Sweeps: the small models are cheap (fine steps); MiniLM costs ~15-20 s per point for the evaluation
# alone (NNCodec: +20-25 s to encode), so its sweeps are short and centred on the threshold.
CODECS: list[Codec] = [
    Codec("nncodec", "NNCodec 2.1.3 (qp)", "qp",
          {"digits": list(range(-32, -13)) + [-34, -36, -40, -44], "minilm": [-36, -34, -33, -32, -30],
           "dwsep": list(range(-40, -15)), "seqrnn": list(range(-40, -11)), "autoenc": list(range(-42, -19)),
           "codelm": list(range(-40, -21))},
          _nncodec_run, _nncodec_available),
    tqcodec_codec("uniform-channel", "tqcodec uniform, per channel (snr_db)", "snr_db",
                  {"digits": list(range(14, 41)), "minilm": [26, 28, 29, 30, 32], **SMALL_SNR},
                  lambda v: {"mode": "auto", "granularity": "channel", "snr_db": v}),
    tqcodec_codec("uniform-tensor", "tqcodec uniform, per tensor (snr_db)", "snr_db",
                  {"digits": list(range(14, 41)), "minilm": [26, 28, 29, 30, 32], **SMALL_SNR},
                  lambda v: {"mode": "auto", "granularity": "tensor", "snr_db": v}),
    # The calibrated transform-quantization mode (not in every tqcodec yet: skipped when absent).
    # default mode (tq when bits or stats are given): tqcodec.save(sd, path, stats=stats, bits=B)
    tqcodec_codec("tq", "tqcodec tq, calibrated (bits; encode s include calibration)", "bits",
                  {"digits": [0.9, 1.0, 1.1, 1.2, 1.35, 1.5, 1.75, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0],
                   "minilm": [2.8, 2.9, 3.0, 3.1, 3.2, 3.4, 3.7],
                   "dwsep": [3.0, 3.5, 3.75, 4.0, 4.25, 4.5, 4.75, 5.0, 5.25, 5.5, 6.0, 6.5, 7.0, 8.0],
                   "seqrnn": [1.25, 1.35, 1.5, 1.6, 1.75, 1.9, 2.0, 2.25, 2.5, 2.75, 3.0, 3.5, 4.0, 5.0, 6.0, 8.0],
                   "autoenc": [3.0, 3.25, 3.5, 3.75, 4.0, 4.25, 4.5, 5.0, 5.5, 6.0, 6.5, 7.0, 8.0],
                   "codelm": [3.0, 3.25, 3.5, 3.625, 3.75, 3.875, 4.0, 4.25, 4.5, 5.0, 5.5, 6.0, 7.0, 8.0]},
                  lambda v: {"bits": v}, calibrated=True, available=_tq_available),
    # digits: as dense as NNCodec's qp sweep there (each qp is a 2^(1/4) step, about 0.13 bits/param),
    # so that neither codec's smallest transparent point gets more draws of the one-image pass
    tqcodec_codec("tq-datafree", "tqcodec tq, data-free (bits)", "bits",
                  {"digits": [1.25, 1.375, 1.5, 1.625, 1.75, 1.875, 2.0, 2.125, 2.25, 2.375, 2.5, 2.625, 2.75,
                              2.875, 3.0, 3.5, 4.0, 5.0, 6.0, 8.0], "minilm": [4.0, 4.25, 4.4, 4.5, 4.6, 4.75, 5.0, 5.5],
                   "dwsep": [3.0, 4.0, 4.5, 5.0, 5.25, 5.5, 5.75, 6.0, 6.5, 7.0, 8.0],
                   "seqrnn": [1.5, 2.0, 2.25, 2.5, 2.75, 3.0, 3.5, 4.0, 5.0, 6.0, 8.0],
                   "autoenc": [4.0, 5.0, 5.5, 5.75, 6.0, 6.25, 6.5, 7.0, 8.0],
                   "codelm": [4.0, 4.25, 4.375, 4.5, 4.625, 4.75, 4.875, 5.0, 5.25, 5.5, 6.0, 7.0, 8.0]},
                  lambda v: {"bits": v}, available=_tq_available),
    # Modes ecsq, kmeans, pq, dither (spec 1.2, tqcodec.lineage): forced for every float tensor of
    # >= 2 dims and >= 256 elements, bits per weight of each such tensor (the rest raw: whole-file
    # rates are higher), importance from the same calibration statistics; and mode auto (tq or one of
    # them per tensor by D + lam R, whole-file bits).
    *[tqcodec_codec(m, f"tqcodec {m}, calibrated importance (bits per tensor)", "bits",
                    {"digits": [1.0, 1.5, 2.0, 2.5, 3.0, 4.0], "minilm": [3.0, 3.5, 4.0, 4.5, 5.0]},
                    lambda v, m=m: {"mode": m, "bits": v}, calibrated=True, available=_tq_available)
      for m in ("ecsq", "kmeans", "pq", "dither")],
    tqcodec_codec("ecsq-snr", "tqcodec ecsq, calibrated importance (weighted snr_db per tensor)", "snr_db",
                  {"digits": [12, 14, 16, 18, 20, 22], "minilm": [24, 26, 28, 30]},
                  lambda v: {"mode": "ecsq", "snr_db": v}, calibrated=True, available=_tq_available),
    tqcodec_codec("auto", "tqcodec auto (tq or ecsq/kmeans/pq/dither per tensor), calibrated (bits)", "bits",
                  {"digits": [0.9, 1.0, 1.1, 1.2, 1.35, 1.5, 1.75, 2.0], "minilm": [3.5, 3.7, 3.8, 4.0, 4.5]},
                  lambda v: {"mode": "auto", "bits": v}, calibrated=True, available=_tq_available),
    Codec("tq-finetuned", "tqcodec tq, calibrated, fine-tuned at the same rate (bits; encode s include "
          "calibration and fine-tuning)", "bits", {"digits": [1.0, 1.2], "minilm": [3.4]}, _tq_finetuned_run,
          lambda args: None if hasattr(tqcodec, "finetune") else "this tqcodec has no finetune()",
          {"calibrated": True}),
    # the simple lossless-storage baseline: weights cast to fp16, then zstd (tqcodec raw mode)
    tqcodec_codec("fp16-zstd", "fp16 + zstd (tqcodec --lossless of the fp16 cast)", "variant",
                  {m: ["fp16"] for m in MODEL_NAMES}, lambda v: {"lossless": True},
                  prepare=lambda sd: {k: (t.half() if t.is_floating_point() else t) for k, t in sd.items()}),
]


# --- the sweep ----------------------------------------------------------------------------------

def sweep_model(model: str, codecs: list[Codec], args) -> dict:
    zoo = MODELS[model]
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if model == "minilm":
        reference = minilm.original_state_dict()
    else:  # trained here, deterministically (cached in the work folder)
        reference = zoo.reference_state_dict(workdir / f"{zoo.NAME}.pt")
    ref_path = workdir / f"{model}-reference.pt"
    torch.save(reference, ref_path)
    ctx = Context(model, zoo, reference, ref_path, workdir, args)
    params = ctx.parameters
    ref_eval = zoo.evaluate(reference, reference)
    print(f"{model}: {params} parameters, reference {zoo.METRIC} {ref_eval['value']:.4f} "
          f"(transparent: >= {zoo.TRANSPARENT}) [{time.perf_counter() - t0:.1f} s]", flush=True)
    out = {"model": zoo.NAME, "parameters": params, "metric": zoo.METRIC, "transparent_at": zoo.TRANSPARENT,
           "reference_metric": ref_eval["value"], "reference_fp32_bytes": 4 * params, "codecs": {}}
    for codec in codecs:
        why = codec.available(args) or (None if model in codec.sweeps else f"no sweep for {model}")
        if why:
            print(f"  {codec.name}: skipped ({why})", flush=True)
            out["codecs"][codec.name] = {"label": codec.label, "skipped": why}
            continue
        values = getattr(args, f"{model}_{codec.param}", None) or codec.sweeps[model]
        load0 = os.getloadavg()[0]
        if args.minilm_quick and model == "minilm":
            values = values[1:-1] if len(values) > 3 else values
        points = []
        t_codec = time.perf_counter()
        for r in codec.run(ctx, values):
            t_eval = time.perf_counter()
            ev = zoo.evaluate(r.pop("decoded"), reference)
            eval_s = time.perf_counter() - t_eval
            p = {codec.param: r["value"], "bytes": r["bytes"], "bits_per_param": 8 * r["bytes"] / params,
                 "metric": ev["value"], "transparent": zoo.is_transparent(ev),
                 "encode_s": round(r["encode_s"], 3), "decode_s": round(r["decode_s"], 3),
                 "eval_s": round(eval_s, 2), "options": r["options"],
                 "eval": {k: v for k, v in ev.items() if k not in ("model", "metric", "value", "n")}}
            points.append(p)
            print(f"  {codec.name:16} {codec.param}={r['value']!s:>6}  {r['bytes']:>10} B  "
                  f"{p['bits_per_param']:6.3f} b/p  {zoo.METRIC} {ev['value']:.4f}"
                  f"{'  T' if p['transparent'] else ''}", flush=True)
        entry = {"label": codec.label, "param": codec.param, "points": points,
                 "seconds": round(time.perf_counter() - t_codec, 1),
                 "loadavg": [round(load0, 2), round(os.getloadavg()[0], 2)],
                 "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
        entry.update(summarize(points))
        entry["more_rate_never_hurts"] = monotone(points)
        out["codecs"][codec.name] = entry
    return out


def summarize(points: list[dict]) -> dict:
    """The smallest transparent point; whether some larger point failed (non-monotonic); and the
    smallest *stable* transparent point: the smallest from which every larger point of the sweep
    is transparent too (on digits one test image is 0.2 points, so single points are noisy)."""
    ok = [p for p in points if p["transparent"]]
    if not ok:
        return {"smallest_transparent": None, "smallest_stable_transparent": None}
    best = min(ok, key=lambda p: p["bytes"])
    failing_larger = [p for p in points if not p["transparent"] and p["bytes"] > best["bytes"]]
    largest_failing = max((p["bytes"] for p in points if not p["transparent"]), default=-1)
    stable = [p for p in ok if p["bytes"] > largest_failing]
    return {"smallest_transparent": best, "non_monotonic": bool(failing_larger),
            "failing_points_larger_than_smallest_transparent": len(failing_larger),
            "smallest_stable_transparent": min(stable, key=lambda p: p["bytes"]) if stable else None}


# --- reports ------------------------------------------------------------------------------------

def monotone(points: list[dict], up_to: float = MONOTONE_UP_TO) -> Optional[dict]:
    """More rate never hurts: the points from the smallest transparent one up to ``up_to``
    bits/param (None when no point is transparent)."""
    ok = [p for p in points if p["transparent"]]
    if not ok:
        return None
    start = min(ok, key=lambda p: p["bytes"])
    span = [p for p in sorted(points, key=lambda p: p["bytes"])
            if start["bytes"] <= p["bytes"] and p["bits_per_param"] <= up_to + 1e-9] or [start]
    return {"from_bits_per_param": start["bits_per_param"], "to_bits_per_param": span[-1]["bits_per_param"],
            "points": len(span), "transparent": sum(p["transparent"] for p in span),
            "min_metric": min(p["metric"] for p in span),
            "failing": [round(p["bits_per_param"], 3) for p in span if not p["transparent"]]}


def monotone_table(result: dict) -> list[str]:
    """Markdown rows: per model and codec, whether every point of the sweep from the codec's
    smallest transparent point up to MONOTONE_UP_TO bits/param is transparent."""
    rows = [f"| model | codec | points from smallest transparent up to {MONOTONE_UP_TO:g} bits/param | "
            "transparent | lowest metric | failing points (bits/param) |", "|---|---|---|---|---|---|"]
    for m in result["models"].values():
        for c in m["codecs"].values():
            if "points" not in c:
                continue
            mono = monotone(c["points"])
            if mono is None:
                rows.append(f"| {m['model']} | {c['label']} | none transparent | | | |")
                continue
            verdict = "all" if mono["transparent"] == mono["points"] else f"{mono['transparent']} of {mono['points']}"
            rows.append(f"| {m['model']} | {c['label']} | {mono['points']} ({mono['from_bits_per_param']:.2f}"
                        f"-{mono['to_bits_per_param']:.2f}) | {verdict} | {mono['min_metric']:.4f} | "
                        f"{', '.join(map(str, mono['failing'])) or '-'} |")
    return rows


def summary_table(result: dict) -> list[str]:
    """Markdown rows: per codec and model, the smallest transparent file, bytes (bits/param), and
    its ratio to NNCodec's smallest transparent file of the same run; the stable point in
    brackets where it differs (README copies this table)."""
    models = list(result["models"].values())
    head = "| codec | " + " | ".join(f"{m['model']}: smallest transparent, bytes (bits/param) [stable] | "
                                      f"vs NNCodec" for m in models) + " |"
    rows = [head, "|---|" + "---|---|" * len(models)]

    def fmt(pt):
        return "none in the sweep" if pt is None else f"{pt['bytes']:,} ({pt['bits_per_param']:.2f})"
    labels: dict[str, str] = {}
    for m in models:
        for name, c in m["codecs"].items():
            labels.setdefault(name, c.get("label", name))
    for name, label in labels.items():
        cells = []
        for m in models:
            c = m["codecs"].get(name)
            if c is None or "skipped" in c:
                cells += ["not run", ""]
                continue
            best, stable = c.get("smallest_transparent"), c.get("smallest_stable_transparent")
            text = fmt(best) + ("" if stable is None or best is None or stable["bytes"] == best["bytes"]
                                else f" [{fmt(stable)}]")
            ref = m["codecs"].get("nncodec", {})
            nb, ns = ref.get("smallest_transparent"), ref.get("smallest_stable_transparent")
            ratio = ""
            if best is not None and nb is not None and name != "nncodec":
                ratio = f"{best['bytes'] / nb['bytes']:.2f}x"
                if stable is not None and ns is not None and ns["bytes"] != nb["bytes"]:
                    ratio += f" [{stable['bytes'] / ns['bytes']:.2f}x]"
            cells += [text, ratio]
        rows.append(f"| {label} | " + " | ".join(cells) + " |")
    return rows


def bytes_at_quality(points: list[dict], levels: tuple = EQUAL_QUALITY_DB) -> dict[float, float]:
    """Fitted bytes at each logit SQNR level (dB) that the points (with ``eval.logit_sqnr_db``)
    reach on both sides; levels outside them are left out."""
    pts = [(p["eval"]["logit_sqnr_db"], p["bytes"]) for p in points
           if isinstance(p.get("eval"), dict) and isinstance(p["eval"].get("logit_sqnr_db"), (int, float))]
    pts = [(q, b) for q, b in pts if min(levels) - FIT_MARGIN_DB <= q <= max(levels) + FIT_MARGIN_DB]
    if len(pts) < 4:
        return {}
    q = np.array([a for a, _ in pts])
    fit = np.polyfit(q, np.log2([b for _, b in pts]), 2)
    return {lv: float(2 ** np.polyval(fit, lv)) for lv in levels if q.min() <= lv <= q.max()}


def equal_quality_table(result: dict) -> list[str]:
    """Markdown rows: per model with logit SQNR and codec, the fitted bytes at equal logit SQNR
    over NNCodec's (see ``EQUAL_QUALITY_DB``)."""
    rows = []
    for m in result["models"].values():
        ref = bytes_at_quality(m["codecs"].get("nncodec", {}).get("points", []))
        if not ref:
            continue
        for name, c in m["codecs"].items():
            if name == "nncodec" or "points" not in c:
                continue
            mine = bytes_at_quality(c["points"])
            cells = [f"{mine[lv] / ref[lv]:.2f}x" if lv in mine and lv in ref else "-" for lv in EQUAL_QUALITY_DB]
            if any(x != "-" for x in cells):
                rows.append(f"| {m['model']} | {c['label']} | " + " | ".join(cells) + " |")
    if not rows:
        return []
    return ["## Bytes at equal logit SQNR", "",
            "Top-1 passes or fails by single test images, so a smallest transparent point is partly a draw. "
            "Here each codec's log2(bytes) is fitted by a quadratic in the logit SQNR over its points (within "
            f"{FIT_MARGIN_DB:g} dB of these levels), and its bytes at each level are given over NNCodec's "
            "(below 1: smaller than NNCodec at the same logit SQNR; - where the sweep does not reach it):", "",
            "| model | codec | " + " | ".join(f"{lv:g} dB" for lv in EQUAL_QUALITY_DB) + " |",
            "|---|---|" + "---|" * len(EQUAL_QUALITY_DB)] + rows + [""]


def write_markdown(result: dict, path: Path) -> None:
    lines = ["# Rate-distortion: tqcodec vs NNCodec", "",
             "Generated by `benchmarks/rd.py` (see `benchmarks/README.md`). Rate = whole file "
             "(.tqz, or NNCodec's whole bitstream) in bits per parameter (every state-dict value counts, "
             "BatchNorm buffers included). Transparent: "
             + "; ".join(f"{m['model']} {m['metric']} >= {m['transparent_at']}" for m in result["models"].values())
             + ".", "",
             f"Machine: {result['machine']}. Last run {result['started']} UTC, {result.get('seconds', 0):.0f} s"
             + (f"; 1-min load average at start {result['loadavg_start']}" if "loadavg_start" in result else "")
             + ". Encode/decode seconds are wall-clock (NNCodec single-threaded); on a shared machine they "
             "move with the load.", ""]
    if result.get("merged_into"):
        lines += [f"This file merges runs: the first started {result['merged_into']} UTC, the last "
                  f"{result['started']} UTC (`--merge`).", ""]
    for note in result.get("notes", []):
        lines += [f"- {note}"]
    if result.get("notes"):
        lines.append("")
    lines += summary_table(result) + [""]
    lines += equal_quality_table(result)
    lines += ["## More rate never hurts", "",
              f"Every point of each sweep from the codec's smallest transparent point up to {MONOTONE_UP_TO:g} "
              "bits/param (the sweeps are finite: this covers the points swept, not every rate between):", ""]
    lines += monotone_table(result) + [""]
    loads = [(m["model"], c["label"], c["loadavg"], c.get("peak_rss_mb")) for m in result["models"].values()
             for c in m["codecs"].values() if "loadavg" in c]
    if loads:
        lines += ["1-min load average at the start and end of each codec's sweep, and the sweep process's peak "
                  "RSS so far (MB): " + "; ".join(f"{mo} / {lab.split(' (')[0]}: {la[0]}-{la[1]}, {rss} MB"
                                                  for mo, lab, la, rss in loads) + ".", ""]
    for m in result["models"].values():
        fp32 = m["reference_fp32_bytes"]
        lines += [f"## {m['model']} ({m['parameters']:,} parameters, reference {m['metric']} "
                  f"{m['reference_metric']:.4f})", "",
                  "Smallest transparent point of each codec (*stable*: the smallest point from which every "
                  "larger point of the sweep is transparent too; differs from the smallest when the metric "
                  "is not monotonic):", "",
                  "| codec | which | setting | bytes | bits/param | vs fp32 | " + m["metric"]
                  + " | encode s | decode s |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for c in m["codecs"].values():
            if "skipped" in c:
                lines.append(f"| {c['label']} | skipped: {c['skipped']} | | | | | | | |")
                continue
            shown = []
            for which, key in (("smallest", "smallest_transparent"), ("stable", "smallest_stable_transparent")):
                b = c.get(key)
                if b is None:
                    lines.append(f"| {c['label']} | {which} | none transparent in the sweep | | | | | | |")
                    continue
                if shown and b == shown[-1]:
                    lines[-1] = lines[-1].replace("| smallest |", "| smallest = stable |", 1)
                    continue
                shown.append(b)
                lines.append(f"| {c['label']} | {which} | {c['param']}={b[c['param']]} | {b['bytes']:,} | "
                             f"{b['bits_per_param']:.3f} | {fp32 / b['bytes']:.1f}x | {b['metric']:.4f} | "
                             f"{b['encode_s']:.2f} | {b['decode_s']:.2f} |")
        lines += ["", "All points:", ""]
        for c in m["codecs"].values():
            if "skipped" in c:
                continue
            lines += [f"{c['label']}:", "", f"| {c['param']} | bytes | bits/param | {m['metric']} | transparent |",
                      "|---|---|---|---|---|"]
            for p in sorted(c["points"], key=lambda p: p["bytes"]):
                lines.append(f"| {p[c['param']]} | {p['bytes']:,} | {p['bits_per_param']:.3f} | "
                             f"{p['metric']:.4f} | {'yes' if p['transparent'] else 'no'} |")
            lines.append("")
    path.write_text("\n".join(lines) + "\n")


def write_plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    models = list(result["models"].values())
    cols = min(3, len(models))
    rows = -(-len(models) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.5 * cols, 4.8 * rows), squeeze=False)
    for ax in axes.flat[len(models):]:
        ax.set_visible(False)
    for ax, m in zip(axes.flat, models):
        thr = m["transparent_at"]
        lo = thr - 4 * (1.0 - thr)
        for c in m["codecs"].values():
            if "skipped" in c or not c["points"]:
                continue
            pts = sorted(c["points"], key=lambda p: p["bits_per_param"])
            ax.plot([p["bits_per_param"] for p in pts], [max(p["metric"], lo) for p in pts], "o-",
                    ms=3.5, lw=1.2, label=c["label"])
        ax.axhline(thr, color="k", ls="--", lw=0.8, label=f"transparent ({thr})")
        ax.set_ylim(lo - 0.2 * (1.0 - thr), 1.0 + 0.2 * (1.0 - thr))
        ax.set_xlabel("bits per parameter (whole file)")
        ax.set_ylabel(f"{m['metric']} (points below {lo:.3f} drawn at {lo:.3f})")
        ax.set_title(f"{m['model']} ({m['parameters']:,} params)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nncodec-python", help="python of the venv where nncodec is installed")
    ap.add_argument("--models", default="digits,dwsep,seqrnn,autoenc,minilm",
                    help="comma-separated from: " + ", ".join(MODEL_NAMES))
    ap.add_argument("--codecs", default=",".join(c.name for c in CODECS),
                    help="comma-separated names from: " + ", ".join(c.name for c in CODECS))
    ap.add_argument("--workdir", default=str(RESULTS / "tmp"))
    ap.add_argument("--out", default=str(RESULTS), help="folder for rd.json, rd.md, rd.png")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--merge", action="store_true",
                    help="keep the other codecs' results already in OUT/rd.json (e.g. add one codec)")
    ap.add_argument("--report-only", action="store_true", help="rewrite rd.md and rd.png from OUT/rd.json")
    ap.add_argument("--minilm-quick", action="store_true", help="MiniLM: drop the first and last point of each sweep")
    for model in MODEL_NAMES:
        for param, typ in (("qp", int), ("snr_db", float), ("bits", float)):
            ap.add_argument(f"--{model}-{param.replace('_', '-')}", type=typ, nargs="+",
                            help=f"override the {param} sweep on {model}")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    wanted = args.codecs.split(",")
    unknown = set(wanted) - {c.name for c in CODECS}
    if unknown:
        ap.error(f"unknown codecs: {', '.join(sorted(unknown))}")
    codecs = [c for c in CODECS if c.name in wanted]
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    result = {"started": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
              "machine": f"{os.cpu_count()} CPUs, torch {torch.__version__}, tqcodec {tqcodec.__version__}, "
                         f"{args.threads} torch threads",
              "loadavg_start": round(os.getloadavg()[0], 2), "models": {}}
    json_path = out_dir / "rd.json"
    if args.report_only:
        result = json.loads(json_path.read_text())
        for m in result["models"].values():
            for c in m["codecs"].values():
                if "points" in c:
                    c.update(summarize(c["points"]))
        json_path.write_text(json.dumps(result, indent=1))
    else:
        previous = json.loads(json_path.read_text()) if args.merge and json_path.exists() else None
        for model in args.models.split(","):
            entry = sweep_model(model, codecs, args)
            if previous and model in previous["models"]:  # keep the other codecs' earlier results
                merged = previous["models"][model]
                merged["codecs"].update(entry["codecs"])
                entry = merged
            result["models"][model] = entry
            result["seconds"] = time.perf_counter() - t0
            if previous:
                for k, v in previous["models"].items():
                    result["models"].setdefault(k, v)
                result["merged_into"] = previous.get("started")
                order = list(MODEL_NAMES)  # the tables' columns in one order, whichever models a run took
                result["models"] = dict(sorted(result["models"].items(),
                                               key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)))
            json_path.write_text(json.dumps(result, indent=1))  # after each model: partial results survive
    write_markdown(result, out_dir / "rd.md")
    write_plot(result, out_dir / "rd.png")
    print(f"wrote {json_path}, rd.md, rd.png ({result.get('seconds', 0):.0f} s of sweeps)")


if __name__ == "__main__":
    main()
