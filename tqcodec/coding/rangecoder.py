"""The range coder of spec §8 (``spec/range-coder.md``), run by constriction 0.5.

constriction's queue ``RangeEncoder`` (32-bit words, 64-bit state, 24-bit precision) with a
``Categorical`` model built as ``Categorical(float64(freq - 1), perfect=False)`` is exactly the
coder §8 defines: that construction makes constriction's internal scale exactly 1.0, so the
model's cumulative table is the integer table ``freq`` itself (§8.2) and no float rounding enters
the bitstream. ``tests/reference_rangecoder.py`` is a plain-Python transcription of §8 that the
tests hold this module to, byte for byte.
"""
from __future__ import annotations

import constriction
import numpy as np

from ..errors import fail
from ..format.leb128 import TOTAL  # spec §8.2: a table's frequencies sum to 2^PRECISION

PRECISION = 24


def _model(freqs: np.ndarray):

    weights = np.asarray(freqs, dtype=np.float64) - 1.0  # exact: integers < 2^24
    return constriction.stream.model.Categorical(weights, perfect=False)


def _check_table(freqs: np.ndarray) -> np.ndarray:
    f = np.asarray(freqs)
    if f.ndim != 1 or len(f) < 2 or f.min() < 1 or int(f.astype(np.int64).sum()) != TOTAL:
        raise fail("BAD_TABLE", "a range-coded model needs at least 2 frequencies, each >= 1, summing to 2^24")
    return f


class Model:
    """A checked frequency table and its constriction model, built once and used for every chunk
    of a tensor: building the model costs ~200 us for a 65536-symbol table, so building it per
    chunk let a file of many tiny chunks cost ~6 us of CPU per file byte. The table is checked
    here; the model is built on first use (not at all when worker processes decode every chunk,
    ``tqcodec.coding.workers``)."""

    def __init__(self, freqs: np.ndarray):
        self.freqs = _check_table(freqs)
        self._model = None

    @property
    def model(self):
        if self._model is None:
            self._model = _model(self.freqs)
        return self._model


def encode_symbols(symbols: np.ndarray, freqs: np.ndarray) -> np.ndarray:
    """Spec §8.3: range-code ``symbols`` (ints in [0, len(freqs))) with one categorical model.

    Returns the sealed payload as little-endian-ready uint32 words (at least one word when
    ``symbols`` is not empty).
    """

    f = _check_table(freqs)
    sym = np.ascontiguousarray(symbols, dtype=np.int32)
    if sym.size and (sym.min() < 0 or sym.max() >= len(f)):
        raise fail("BAD_PAYLOAD", "a symbol lies outside the model's alphabet")
    if np.any(f[sym] < 1):  # pragma: no cover - _check_table makes every freq >= 1
        raise fail("BAD_PAYLOAD", "a symbol has zero probability")
    encoder = constriction.stream.queue.RangeEncoder()
    if sym.size:
        encoder.encode(sym, _model(f))
    return encoder.get_compressed().astype(np.uint32, copy=False)


def decode_symbols(words: np.ndarray, freqs: "np.ndarray | Model", count: int) -> np.ndarray:
    """Spec §8.4: decode ``count`` symbols from ``words`` with the model ``freqs``.

    Applies §8.5's rejection rule: the payload must decode (no quantile outside the model) and
    must be, word for word, what §8.3 encodes for the decoded symbols. That one rule rejects a
    payload that ends early, carries words past the last symbol, or seals off-canonically.
    Every failure is a ``TqzError`` with code ``BAD_PAYLOAD``. Re-encoding costs about a fifth
    of the decode (constriction encodes ~4x faster than it decodes).
    """

    prepared = freqs if isinstance(freqs, Model) else Model(freqs)
    w = np.ascontiguousarray(words, dtype=np.uint32)
    if count < 1 or w.size < 1:
        raise fail("BAD_PAYLOAD", f"range-coded payload of {w.size} words for {count} symbols")
    try:
        model = prepared.model
        out = constriction.stream.queue.RangeDecoder(w).decode(model, int(count))
        encoder = constriction.stream.queue.RangeEncoder()
        encoder.encode(out, model)
        canonical = encoder.get_compressed()
    except BaseException as exc:  # constriction raises AssertionError/ValueError/... on bad data
        if isinstance(exc, (KeyboardInterrupt, SystemExit, MemoryError)):
            raise
        raise fail("BAD_PAYLOAD", f"range-coded payload does not decode: {type(exc).__name__}") from None
    if canonical.shape != w.shape or not np.array_equal(canonical, w):
        raise fail("BAD_PAYLOAD", f"range-coded payload of {w.size} words is not the coding of its "
                                  f"{count} symbols (cut short, trailing words, or altered)")
    return np.asarray(out, dtype=np.int32)
