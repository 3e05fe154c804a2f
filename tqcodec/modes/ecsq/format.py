"""Mode ``ecsq`` (spec §7.6, ``spec/mode-lineage.md``): entropy-constrained scalar quantization.

Each element has a symbol range-coded with one counts table (§7.S.2); symbol ``s`` reconstructs
as the grid point ``(q_min + s) * step`` (``recon = "grid"``) or as the ``s``-th stored value of a
strictly increasing table (``recon = "codebook"``, float16 or float32 values in stream 0).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from ...errors import fail
from ...format.chunks import PayloadKind, StreamSpec
from ...format.dtypes import round_binary32
from ...format.leb128 import pack_counts, unpack_counts
from ...format.manifest import TensorRecord
from ...format.steps import STEP_CODE_MAX, STEP_CODE_MIN, steps_from_codes
from ..base import Chunks, Encoded, check_float, check_keys
from ..streams import (PRECISIONS, check_increasing, check_levels, check_precision, read_symbols, read_values,
                       symbol_chunks, table, value_chunks)

RECONS = ("grid", "codebook")
_REQUIRED = {"recon": str, "counts": bytes}
_OPTIONAL = {"step": int, "q_min": int, "precision": str}


@dataclass(frozen=True)
class Params:
    recon: str
    step: int  # grid: the step code (0 for a codebook)
    q_min: int  # grid: the first level (0 for a codebook)
    precision: Optional[str]  # codebook: the stored values' precision
    counts: np.ndarray
    freqs: Optional[np.ndarray]


def parse(record: TensorRecord) -> Params:
    """Spec §7.6.1's checks, in order."""
    name = record.name
    p = check_keys(record, _REQUIRED, _OPTIONAL)  # rule 1
    check_float(record, rows=False)  # rule 2
    step, q_min, precision = 0, 0, None
    recon = p["recon"]  # rule 3
    if recon not in RECONS:
        raise fail("BAD_TENSOR_RECORD", f"tensor {name!r}: recon {recon!r} not in {RECONS}")
    if recon == "grid":
        if "step" not in p or "q_min" not in p or "precision" in p:
            raise fail("BAD_TENSOR_RECORD", f"tensor {name!r}: recon grid needs step and q_min, no precision")
    else:
        if "step" in p or "q_min" in p:
            raise fail("BAD_TENSOR_RECORD", f"tensor {name!r}: recon codebook takes no step or q_min")
        precision = check_precision(record, p.get("precision", "float16"))
    if recon == "grid":  # rule 4
        step, q_min = p["step"], p["q_min"]
        if not STEP_CODE_MIN <= step <= STEP_CODE_MAX:
            raise fail("BAD_STEP", f"tensor {name!r}: step code {step} outside [{STEP_CODE_MIN}, {STEP_CODE_MAX}]")
    counts = unpack_counts(p["counts"], record.numel, name, "inner" if recon == "grid" else "none")  # rule 5
    if recon == "grid":  # rule 6
        check_levels(q_min, len(counts), name)
    return Params(recon, step, q_min, precision, counts, table(counts))


def stream_items(p: Params, index: int, records: Sequence[TensorRecord]) -> tuple[StreamSpec, ...]:
    """Spec §7.6.2: stream 0 the stored values' bytes (codebook), stream 1 the symbols."""
    values = 0 if p.recon == "grid" else len(p.counts) * PRECISIONS[p.precision].itemsize
    return (StreamSpec(values, PayloadKind.BYTES),
            StreamSpec(records[index].numel if p.freqs is not None else 0, PayloadKind.SYMBOLS))


def symbol_tables(p: Params) -> tuple[Optional[np.ndarray], ...]:
    """The range-coder table of each stream (None: not range-coded): stream 1's."""
    return None, p.freqs


def reconstruct(recon: str, symbols: np.ndarray, *, step: int = 0, q_min: int = 0,
                values: Optional[np.ndarray] = None) -> np.ndarray:
    """Spec §7.6.3 before rounding: float32 values of ``symbols`` (exact)."""
    if recon == "grid":
        s = float(steps_from_codes([step])[0])
        out = (symbols + q_min).astype(np.float32)  # exact: |level| <= 2^20
        out *= np.float32(s)  # exact: 3 significant bits times 21
        return out
    return np.asarray(values, dtype=np.float32)[symbols]


def parts(p: Params, record: TensorRecord, streams: list[Chunks]) -> dict:
    """``symbols`` (int64, flat, C order), ``recon``, and ``step``/``q_min`` (grid) or ``values``
    (float32, the stored codebook) and ``precision``."""
    values = None
    if p.recon == "codebook":
        values = read_values(streams[0], len(p.counts), p.precision, record.name)
        check_increasing(values, record.name, "codebook")
    symbols = read_symbols(streams[1], p.freqs, record.numel, record.name)
    return {"symbols": symbols, "recon": p.recon, "step": p.step, "q_min": p.q_min,
            "q_max": p.q_min + len(p.counts) - 1, "values": values, "precision": p.precision}


def decode(p: Params, record: TensorRecord, streams: list[Chunks]) -> np.ndarray:
    """Spec §7.6.3: symbols -> grid levels or stored values -> the dtype (§7.S.5)."""
    q = parts(p, record, streams)
    v = reconstruct(p.recon, q["symbols"], step=p.step, q_min=p.q_min, values=q["values"])
    return round_binary32(record.dtype, v).reshape(record.shape)


def write(symbols: np.ndarray, *, recon: str, step: Optional[int] = None, q_min: Optional[int] = None,
          values: Optional[np.ndarray] = None, precision: str = "float16") -> Encoded:
    """An ``ecsq`` tensor from its symbols (C order, ints >= 0).

    ``grid``: ``step`` code and ``q_min`` (the symbols are ``level - q_min``; the first and last
    symbol must occur). ``codebook``: ``values`` (strictly increasing, representable in
    ``precision``, each used by some symbol).
    """
    sym = np.asarray(symbols, dtype=np.int64).reshape(-1)
    if recon == "grid":
        counts = np.bincount(sym)
        params = {"recon": "grid", "counts": pack_counts(counts), "step": int(step), "q_min": int(q_min)}
        return Encoded("ecsq", params, [[], symbol_chunks(sym, counts)])
    vals = np.asarray(values, dtype=np.float64)
    counts = np.bincount(sym, minlength=len(vals))
    params = {"recon": "codebook", "counts": pack_counts(counts)}
    if precision != "float16":
        params["precision"] = precision
    return Encoded("ecsq", params, [value_chunks(vals, precision), symbol_chunks(sym, counts)])
