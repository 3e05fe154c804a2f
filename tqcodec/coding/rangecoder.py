"""The range coder of spec §8 (``spec/range-coder.md``): encoding by constriction 0.5, decoding
by a C transcription of §8.4 that checks §8.5 from its final state.

constriction's queue ``RangeEncoder`` (32-bit words, 64-bit state, 24-bit precision) with a
``Categorical`` model built as ``Categorical(float64(freq - 1), perfect=False)`` is exactly the
coder §8 defines: that construction makes constriction's internal scale exactly 1.0, so the
model's cumulative table is the integer table ``freq`` itself (§8.2) and no float rounding enters
the bitstream. ``tests/reference_rangecoder.py`` is a plain-Python transcription of §8 that the
tests hold this module to, byte for byte.

Decoding is the C extension :mod:`tqcodec.coding.native` (``native.c``): §8.4 word for word, the
symbol found with a lookup table over the top bits of ``q`` and a binary search inside its
bucket, §8.5 checked from the decoder's final state (the source says why that is exact), and the
GIL released, so threads decode chunks side by side. It is about 3x faster than constriction's
decoder followed by §8.5's re-encode, and gives the same verdict on every payload
(``tests/coding/test_rangecoder.py`` holds it to a re-encode on mutated payloads). Where the
extension was not built (no C compiler at install), decoding falls back to constriction and the
re-encode: the same symbols and errors, slower, and holding the GIL.
"""
from __future__ import annotations

import constriction
import numpy as np

from ..errors import fail
from ..format.leb128 import TOTAL  # spec §8.2: a table's frequencies sum to 2^PRECISION

try:
    from . import native
except ImportError:  # built without a C compiler: constriction decodes (see the module's docstring)
    native = None

PRECISION = 24


def _model(freqs: np.ndarray):

    weights = np.asarray(freqs, dtype=np.float64) - 1.0  # exact: integers < 2^24
    return constriction.stream.model.Categorical(weights, perfect=False)


def _check_table(freqs: np.ndarray) -> np.ndarray:
    f = np.asarray(freqs)
    if f.ndim != 1 or len(f) < 2 or f.min() < 1 or int(f.astype(np.int64).sum()) != TOTAL:
        raise fail("BAD_TABLE", "a range-coded model needs at least 2 frequencies, each >= 1, summing to 2^24")
    return f


LOOKUP_BITS = 12  # the decoder's symbol lookup: one entry per 2^(24 - 12) values of q (16 KiB)
_OK, _OUTSIDE = 0, 1  # native.decode's verdicts (2: not canonical)


def _decoder_tables(freqs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(c_0 … c_A, and ``lookup[b]``: the largest s with c_s <= b << 12), both uint32."""
    cumulative = np.zeros(len(freqs) + 1, dtype=np.uint32)
    np.cumsum(freqs, out=cumulative[1:])
    starts = np.arange((1 << LOOKUP_BITS) + 1, dtype=np.int64) << (PRECISION - LOOKUP_BITS)
    lookup = np.searchsorted(cumulative, starts, side="right") - 1
    lookup[-1] = len(freqs) - 1  # q < 2^24 = c_A: the last bucket ends at A - 1
    return cumulative, lookup.astype(np.uint32)


class Model:
    """A checked frequency table, with what encoding and decoding it needs built once and used
    for every chunk of a tensor: constriction's model for the encoder (~200 us for a
    65536-symbol table, which built per chunk let a file of many tiny chunks cost ~6 us of CPU
    per file byte), the cumulative table and symbol lookup for the decoder. Each is built on
    first use."""

    def __init__(self, freqs: np.ndarray):
        self.freqs = _check_table(freqs)
        self._model = None
        self._tables = None

    @property
    def model(self):
        if self._model is None:
            self._model = _model(self.freqs)
        return self._model

    @property
    def tables(self) -> tuple[np.ndarray, np.ndarray]:
        """What the C decoder reads: :func:`_decoder_tables`."""
        if self._tables is None:
            self._tables = _decoder_tables(self.freqs)
        return self._tables

    @property
    def symbol_type(self) -> np.dtype:
        """The narrowest unsigned type that holds every symbol."""
        a = len(self.freqs)
        return np.dtype(np.uint8 if a <= 1 << 8 else np.uint16 if a <= 1 << 16 else np.uint32)


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


def decode_symbols(words: np.ndarray, freqs: "np.ndarray | Model", count: int,
                   narrow: bool = False) -> np.ndarray:
    """Spec §8.4: decode ``count`` symbols from ``words`` with the model ``freqs``: int32, or
    with ``narrow`` the narrowest unsigned type that holds the alphabet.

    Applies §8.5's rejection rule: the payload must decode (no quantile outside the model) and
    must be, word for word, what §8.3 encodes for the decoded symbols. That one rule rejects a
    payload that ends early, carries words past the last symbol, or seals off-canonically.
    Every failure is a ``TqzError`` with code ``BAD_PAYLOAD``. Releases the GIL while it decodes.
    """

    prepared = freqs if isinstance(freqs, Model) else Model(freqs)
    w = np.ascontiguousarray(words, dtype=np.uint32)
    if count < 1 or w.size < 1:
        raise fail("BAD_PAYLOAD", f"range-coded payload of {w.size} words for {count} symbols")
    out_type = prepared.symbol_type if narrow else np.dtype(np.int32)
    if native is None:
        return _decode_and_reencode(w, prepared, int(count)).astype(out_type, copy=False)
    cumulative, lookup = prepared.tables
    out = np.empty(int(count), dtype=out_type)
    verdict = native.decode(w, cumulative, lookup, int(count), out, out.itemsize)
    if verdict == _OUTSIDE:
        raise fail("BAD_PAYLOAD", "range-coded payload does not decode: a value lies outside the model")
    if verdict != _OK:
        raise _not_canonical(w.size, count)
    return out


def _not_canonical(words: int, count: int):
    return fail("BAD_PAYLOAD", f"range-coded payload of {words} words is not the coding of its "
                               f"{count} symbols (cut short, trailing words, or altered)")


def _decode_and_reencode(w: np.ndarray, prepared: Model, count: int) -> np.ndarray:
    """§8.4 by constriction's decoder and §8.5 rule 2 as the spec words it: re-encode, compare."""
    try:
        model = prepared.model
        out = constriction.stream.queue.RangeDecoder(w).decode(model, count)
        encoder = constriction.stream.queue.RangeEncoder()
        encoder.encode(out, model)
        canonical = encoder.get_compressed()
    except BaseException as exc:  # constriction raises AssertionError/ValueError/... on bad data
        if isinstance(exc, (KeyboardInterrupt, SystemExit, MemoryError)):
            raise
        raise fail("BAD_PAYLOAD", f"range-coded payload does not decode: {type(exc).__name__}") from None
    if canonical.shape != w.shape or not np.array_equal(canonical, w):
        raise _not_canonical(w.size, count)
    return out
