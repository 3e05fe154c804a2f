"""Pictures a person tuning a model wants to see: the bit-depth map of a .tqz file.

Needs matplotlib (``pip install 'tqcodec[plot]'``).
"""
from __future__ import annotations

import os
from typing import Union

import numpy as np

from .errors import fail
from .format.leb128 import unpack_counts
from .io.files import atomic_output


def band_bits(counts: np.ndarray) -> float:
    """Bits per coefficient of a band: the entropy of its stored symbol counts (spec §7.5.1), which
    the range coder meets to within its table's rounding."""
    c = np.asarray(counts, dtype=np.float64)
    c = c[c > 0]
    p = c / c.sum()
    return float(-(p * np.log2(p)).sum())


def allocation_rows(f) -> list[dict]:
    """Per tensor of an open TqzFile: its bands as (fraction of rows, bits per weight), the
    transform choice, the rows dropped and whether its bands are sets of rows (``row_band``). Non-tq tensors are one band at their stored bits."""

    rows = []
    for name in f.keys():
        info = f.info(name)
        entry = {"name": name, "mode": info.mode, "numel": info.numel, "transform": "none",
                 "bands": [], "dropped": 0.0, "row_band": False}
        if info.mode == "tq" and info.numel:
            p = info.params
            n = info.shape[0] if p.get("layout", "out_in") == "out_in" else info.shape[1]
            m = info.numel // n
            transform = p.get("transform", "none")
            cols = m if transform == "none" else n
            total_rows = n if transform == "none" else min(n, m)
            for r, blob in zip(p["band_rows"], p["counts"]):
                entry["bands"].append((r / total_rows, band_bits(unpack_counts(blob, r * cols, name))))
            entry["transform"] = transform
            entry["row_band"] = "row_band" in p  # bands are sets of rows (spec 1.4), drawn band by band
            entry["dropped"] = 1.0 - sum(p["band_rows"]) / total_rows
        elif info.numel:
            entry["bands"].append((1.0, 8.0 * info.stored_bytes / info.numel))
        rows.append(entry)
    return rows


def bits_scale(rows: list[dict]) -> float:
    """The top of the colour scale: the most bits per weight of any band (raw tensors: 32 and more
    with their headers), at least 1."""
    return max([b for r in rows for _, b in r["bands"]] + [1.0])


def plot_allocation(f, path: Union[str, os.PathLike], title: str = "", overwrite: bool = False) -> None:
    """Draw the bit-depth map of an open TqzFile as a PNG at ``path``: one bar per tensor (file
    order, top to bottom), split into its bands, coloured by bits per weight; dropped rows are
    hatched, tensors with a transform are marked."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib import cm, colors
    except ImportError:
        raise fail("BAD_OPTION", "--plot needs matplotlib: pip install 'tqcodec[plot]'") from None
    rows = allocation_rows(f)
    vmax = bits_scale(rows)
    # the whole range (raw float32 tensors take 32 bits and more), square-root scaled so the few-bit
    # bands of a quantized model stay apart
    norm = colors.PowerNorm(0.5, 0.0, vmax)
    cmap = matplotlib.colormaps["viridis"]
    height = max(3.0, 0.18 * len(rows) + 1.5)
    fig, ax = plt.subplots(figsize=(10, height))
    for y, r in enumerate(rows):
        x = 0.0
        for frac, bits in r["bands"]:
            ax.barh(y, frac, left=x, color=cmap(norm(bits)), edgecolor="white", linewidth=0.3)
            x += frac
        if r["dropped"] > 0:
            ax.barh(y, r["dropped"], left=x, color="white", edgecolor="grey", hatch="///", linewidth=0.3)
        label = f"{r['mode']}" + (" +T" if r["transform"] != "none" else "") + (" +R" if r["row_band"] else "")
        ax.text(1.01, y, label, va="center", fontsize=6)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([r["name"][-48:] for r in rows], fontsize=6)
    ax.invert_yaxis()
    ax.set_xlim(0, 1.12)
    ax.set_xlabel("fraction of the tensor's rows (bands in order; +R: bands are sets of rows, drawn band by "
                  "band; +T: transform, hatched: rows it dropped)")
    total_bits = 8 * f.file_size
    params = sum(r["numel"] for r in rows)
    ax.set_title(title or f"bits per weight by band; whole file {total_bits / max(params, 1):.3f} bits/param")
    fig.colorbar(cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, label="bits per weight", fraction=0.03)
    fig.tight_layout()
    try:
        with atomic_output(path, overwrite) as out:
            fig.savefig(out, format="png", dpi=120)
    finally:
        plt.close(fig)
