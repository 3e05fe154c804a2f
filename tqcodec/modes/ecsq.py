"""Mode ``ecsq`` (spec §7.6, ``spec/mode-lineage.md``): entropy-constrained scalar quantization.

Each element has a symbol range-coded with one counts table (§7.S.2); symbol ``s`` reconstructs
as the grid point ``(q_min + s) * step`` (``recon = "grid"``) or as the ``s``-th stored value of a
strictly increasing table (``recon = "codebook"``, float16 or float32 values in stream 0).
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from ..errors import fail
from ..format.manifest import TensorRecord
from ..steps import STEP_CODE_MAX, STEP_CODE_MIN, steps_from_codes
from . import lineage_common as C

RECONS = ("grid", "codebook")
_REQUIRED = {"recon": str, "counts": bytes}
_OPTIONAL = {"step": int, "q_min": int, "precision": str}


class _Parsed:
    __slots__ = ("recon", "step", "q_min", "precision", "counts", "freqs")


def _parse(record: TensorRecord) -> _Parsed:
    """Spec §7.6.1's checks, in order."""
    name = record.name
    p = C.check_keys(record, _REQUIRED, _OPTIONAL)  # rule 1
    C.check_float(record, rows=False)  # rule 2
    out = _Parsed()
    out.step, out.q_min, out.precision = 0, 0, None
    out.recon = p["recon"]  # rule 3
    if out.recon not in RECONS:
        raise fail("BAD_TENSOR_RECORD", f"tensor {name!r}: recon {out.recon!r} not in {RECONS}")
    if out.recon == "grid":
        if "step" not in p or "q_min" not in p or "precision" in p:
            raise fail("BAD_TENSOR_RECORD", f"tensor {name!r}: recon grid needs step and q_min, no precision")
    else:
        if "step" in p or "q_min" in p:
            raise fail("BAD_TENSOR_RECORD", f"tensor {name!r}: recon codebook takes no step or q_min")
        out.precision = C.check_precision(record, p.get("precision", "float16"))
    if out.recon == "grid":  # rule 4
        out.step, out.q_min = p["step"], p["q_min"]
        if not STEP_CODE_MIN <= out.step <= STEP_CODE_MAX:
            raise fail("BAD_STEP", f"tensor {name!r}: step code {out.step} outside [{STEP_CODE_MIN}, {STEP_CODE_MAX}]")
    out.counts = C.parse_counts(p["counts"], record.numel, name, "inner" if out.recon == "grid" else "none")  # 5
    if out.recon == "grid":  # rule 6
        C.check_levels(out.q_min, len(out.counts), name)
    out.freqs = C.table(out.counts)
    return out


def stream_items(index: int, record: TensorRecord, records: Sequence[TensorRecord]) -> tuple[int, ...]:
    """Spec §7.6.2: stream 0 the stored values' bytes (codebook), stream 1 the symbols."""
    p = _parse(record)
    values = 0 if p.recon == "grid" else len(p.counts) * C.PRECISIONS[p.precision].itemsize
    return values, (record.numel if p.freqs is not None else 0)


def reconstruct(p_recon: str, symbols: np.ndarray, *, step: int = 0, q_min: int = 0,
                values: Optional[np.ndarray] = None) -> np.ndarray:
    """Spec §7.6.3 before rounding: float32 values of ``symbols`` (exact)."""
    if p_recon == "grid":
        s = float(steps_from_codes([step])[0])
        out = (symbols + q_min).astype(np.float32)  # exact: |level| <= 2^20
        out *= np.float32(s)  # exact: 3 significant bits times 21
        return out
    return np.asarray(values, dtype=np.float32)[symbols]


def decode(record: TensorRecord, streams: list[list[tuple[int, bytes]]]) -> np.ndarray:
    """Spec §7.6.3: symbols -> grid levels or stored values -> the dtype (§7.S.5)."""
    p = _parse(record)
    values = None
    if p.recon == "codebook":
        values = C.read_values(streams[0], len(p.counts), p.precision, record.name)
        C.check_increasing(values, record.name, "codebook")
    sym = C.read_symbols(streams[1], p.freqs, record.numel, record.name)
    v = reconstruct(p.recon, sym, step=p.step, q_min=p.q_min, values=values)
    return C.round_binary32(record.dtype, v).reshape(record.shape)


# --- encoder (bitstream only; the numerics are tqcodec.lineage.ecsq) ------------------------------

def encode(symbols: np.ndarray, *, recon: str, step: Optional[int] = None, q_min: Optional[int] = None,
           values: Optional[np.ndarray] = None, precision: str = "float16") -> tuple[dict, list]:
    """Params and streams of an ``ecsq`` tensor from its symbols (C order, ints >= 0).

    ``grid``: ``step`` code and ``q_min`` (the symbols are ``level - q_min``; the first and last
    symbol must occur). ``codebook``: ``values`` (strictly increasing, representable in
    ``precision``, each used by some symbol).
    """
    sym = np.asarray(symbols, dtype=np.int64).reshape(-1)
    if recon == "grid":
        counts = np.bincount(sym)
        params = {"recon": "grid", "counts": C.pack_counts(counts), "step": int(step), "q_min": int(q_min)}
        return params, [[], C.symbol_chunks(sym, counts)]
    vals = np.asarray(values, dtype=np.float64)
    counts = np.bincount(sym, minlength=len(vals))
    params = {"recon": "codebook", "counts": C.pack_counts(counts)}
    if precision != "float16":
        params["precision"] = precision
    return params, [C.value_chunks(vals, precision), C.symbol_chunks(sym, counts)]
