"""Other models than the zoo's: small MLPs (Linear-GELU-Linear), Linear-LayerNorm-Linear heads, an
attention block and a Conv1d/ConvTranspose1d decoder, random weights, inputs of a low-rank law (8
latent directions plus noise), optionally with two input channels 60x the others (the outlier
channels of large language models).

For each model, tq is encoded with ``tqcodec.encode_bytes(sd, stats=S, bits=B)`` at 1, 2, 3 and
4 bits/param, with no statistics, with statistics of 64 inputs, and of 512 (``tqcodec.calibrate``);
each file is decoded and the model's output compared with the original's on 1024 other inputs of
the same law: output SNR in dB (power of the output over the mean squared error). Reported: the
file's bits/param and the SNR, the 1-minute load average and the peak RSS.

Why: the benchmark's two models cannot show what a user's model meets. This sweep found an
all-zero file (a transform whose stored S outweighed the budget), transforms that starved the
rest of the model, and a shrinkage target that outlier channels inflated (issue 15, 2026-12-06).

    python benchmarks/small_models.py            # -> results/small_models.json and .md
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import tqcodec  # noqa: E402

BITS = (1.0, 2.0, 3.0, 4.0)
SAMPLES = (0, 64, 512)
OUTLIER_GAIN = 60.0


class Attention(nn.Module):
    """A projection, one multi-head self-attention with a residual and LayerNorm, a projection out."""

    def __init__(self, width: int):
        super().__init__()
        self.inp = nn.Linear(width, 4 * width)
        self.mha = nn.MultiheadAttention(4 * width, 4, batch_first=True)
        self.ln = nn.LayerNorm(4 * width)
        self.out = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        a, _ = self.mha(h, h, h)
        return self.out(self.ln(h + a))


class Decoder1d(nn.Module):
    """Conv1d, ConvTranspose1d (upsampling by 2), Conv1d: a small signal decoder."""

    def __init__(self, width: int):
        super().__init__()
        self.c1 = nn.Conv1d(width, 4 * width, 5, padding=2)
        self.up = nn.ConvTranspose1d(4 * width, 2 * width, 4, stride=2, padding=1)
        self.c2 = nn.Conv1d(2 * width, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c2(torch.relu(self.up(torch.relu(self.c1(x)))))


def build(kind: str, width: int, ratio: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(width, ratio * width), nn.GELU(), nn.Linear(ratio * width, width)).eval()
    if kind == "attention":
        return Attention(width).eval()
    if kind == "decoder1d":
        return Decoder1d(width).eval()
    return nn.Sequential(nn.Linear(width, ratio * width), nn.LayerNorm(ratio * width),
                         nn.Linear(ratio * width, 10)).eval()


def inputs(width: int, n: int, seed: int, latent: torch.Tensor, outliers: bool, kind: str = "mlp") -> torch.Tensor:
    """``n`` inputs: vectors of the low-rank law; for ``attention`` sequences of 12 of them, for
    ``decoder1d`` 32 steps of them as channels."""
    g = torch.Generator().manual_seed(seed)
    steps = {"attention": 12, "decoder1d": 32}.get(kind, 1)
    x = torch.randn(n * steps, latent.shape[0], generator=g) @ latent + 0.1 * torch.randn(n * steps, width, generator=g)
    if outliers:
        x[:, [3, width // 2]] *= OUTLIER_GAIN
    if kind == "attention":
        return x.reshape(n, steps, width)
    if kind == "decoder1d":
        return x.reshape(n, steps, width).transpose(1, 2).contiguous()
    return x


def snr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    err = float(((out - ref) ** 2).mean())
    return 10.0 * float(np.log10(float((ref ** 2).mean()) / err)) if err > 0 else float("inf")


def run_model(kind: str, width: int, ratio: int, seed: int, outliers: bool) -> dict:
    net = build(kind, width, ratio, seed)
    latent = torch.randn(8, width, generator=torch.Generator().manual_seed(100 + seed))
    calibration = inputs(width, max(SAMPLES), 1, latent, outliers, kind)
    test = inputs(width, 1024, 2, latent, outliers, kind)
    ref = net(test).detach()
    sd = net.state_dict()
    params = sum(v.numel() for v in sd.values())
    rows = {}
    for n in SAMPLES:
        stats = (tqcodec.calibrate(net, [calibration[i:i + 128] for i in range(0, n, 128)]) if n else None)
        points = []
        for bits in BITS:
            data = tqcodec.encode_bytes(sd, stats=stats, bits=bits)
            other = build(kind, width, ratio, seed)
            other.load_state_dict(tqcodec.load(data))
            points.append({"bits": bits, "bytes": len(data), "bits_per_param": round(8 * len(data) / params, 3),
                           "snr_db": round(snr_db(ref, other(test).detach()), 2)})
        rows[str(n)] = points
    return {"model": f"{kind} {width}x{ratio} seed {seed}" + (" outliers" if outliers else ""),
            "params": params, "runs": rows}


def write_md(results: dict, path: Path) -> None:
    lines = ["# Small models other than the zoo's", "",
             "Generated by `benchmarks/small_models.py` (see its docstring): output SNR in dB (file bits/param) "
             f"at --bits {', '.join(str(b) for b in BITS)}, from no statistics and statistics of 64 and 512 inputs. "
             f"Run {results['started']} UTC, {results['seconds']:.0f} s, 1-min load {results['load'][0]:.2f}-"
             f"{results['load'][1]:.2f}, peak RSS {results['peak_rss_mb']:.0f} MB.", "",
             "| model | params | statistics | " + " | ".join(f"--bits {b:g}" for b in BITS) + " |",
             "|---|---|---|" + "---|" * len(BITS)]
    for m in results["models"]:
        for n, points in m["runs"].items():
            cells = [f"{p['snr_db']:.1f} dB ({p['bits_per_param']:.2f})" for p in points]
            lines.append(f"| {m['model']} | {m['params']:,} | {'none' if n == '0' else n + ' inputs'} | "
                         + " | ".join(cells) + " |")
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(HERE / "results" / "small_models.json"))
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    started, t0, load0 = time.strftime("%Y-%m-%d %H:%M", time.gmtime()), time.perf_counter(), os.getloadavg()[0]
    models = []
    shapes = [(kind, width, ratio, 0) for kind, width, ratio in itertools.product(("mlp", "ln"), (32, 96), (2, 4))]
    shapes += [("attention", 16, 4, 0), ("decoder1d", 8, 4, 0)]
    for (kind, width, ratio, seed), outliers in itertools.product(shapes, (False, True)):
        m = run_model(kind, width, ratio, seed, outliers)
        print(m["model"], {n: [p["snr_db"] for p in pts] for n, pts in m["runs"].items()}, flush=True)
        models.append(m)
    results = {"started": started, "seconds": time.perf_counter() - t0, "load": [load0, os.getloadavg()[0]],
               "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "models": models}
    out = Path(args.out)
    out.write_text(json.dumps(results, indent=1) + "\n")
    write_md(results, out.with_suffix(".md"))
    print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
