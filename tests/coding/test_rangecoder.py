"""tqcodec.coding.rangecoder, the range coder of spec §8: constriction reproduces the spec's coder
(tests/coding/reference_rangecoder.py) word for word, rejects payloads that are not canonical, and
builds its model once per table."""
import io

import numpy as np
import pytest

import tqcodec
from tqcodec import TqzError
from tqcodec.coding import decode_symbols, encode_symbols, frequencies_from_counts
from tqcodec.format.leb128 import pack_freqs
from tqcodec.format.manifest import TensorRecord
from tqcodec.format.writer import ContainerWriter
from tests.coding import reference_rangecoder as ref


def _case(seed: int, alphabet: int, n: int, skew: float = 0.3):
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.full(alphabet, skew))
    symbols = rng.choice(alphabet, size=n, p=p)
    freqs = frequencies_from_counts(np.bincount(symbols, minlength=alphabet))
    return symbols, freqs


@pytest.mark.parametrize("seed", range(40))
def test_constriction_matches_the_spec_coder_word_for_word(seed):
    rng = np.random.default_rng(1000 + seed)
    symbols, freqs = _case(seed, int(rng.integers(2, 200)), int(rng.integers(1, 1500)))
    words = encode_symbols(symbols, freqs)
    assert words.tolist() == ref.encode(symbols.tolist(), freqs.tolist())
    assert ref.decode(words.tolist(), freqs.tolist(), len(symbols)) == symbols.tolist()
    assert decode_symbols(words, freqs, len(symbols)).tolist() == symbols.tolist()


def test_carry_and_pending_words_are_exercised():
    # Improbable symbols and power-of-two tables leave the interval straddling a word boundary
    # after renormalisation thousands of times here (measured with an instrumented copy of the
    # reference), which is where §8.3's pending words and carries happen.
    rng = np.random.default_rng(7)
    for freqs in ([(1 << 24) - 3, 1, 1, 1], [1 << 23, 1 << 23], [1 << 22] * 4):
        f = np.array(freqs, dtype=np.uint32)
        for _ in range(10):
            symbols = rng.integers(0, len(f), 3000)
            words = encode_symbols(symbols, f)
            assert words.tolist() == ref.encode(symbols.tolist(), freqs)
            assert decode_symbols(words, f, len(symbols)).tolist() == symbols.tolist()


def test_golden_words_are_stable():
    # Fixed vectors of spec/range-coder.md §8.7: a change here is a format change.
    freqs = np.array([1 << 23, 1 << 22, 1 << 22], dtype=np.uint32)
    assert encode_symbols(np.array([0, 1, 2, 0]), freqs).tolist() == ref.encode([0, 1, 2, 0], freqs.tolist())
    assert encode_symbols(np.array([0, 1, 2, 0]), freqs).tolist() == GOLDEN_A
    assert encode_symbols(np.array([2]), freqs).tolist() == GOLDEN_B
    assert encode_symbols(np.zeros(10, dtype=int), np.array([(1 << 24) - 1, 1])).tolist() == GOLDEN_C


GOLDEN_A = [1476395008]  # spec/range-coder.md §8.7, vector 1
GOLDEN_B = [3221225472]  # §8.7, vector 2
GOLDEN_C = [0]  # §8.7, vector 3: ten 0s with f = [2^24 - 1, 1]


@pytest.mark.parametrize("mutation", ["append", "truncate", "flip_last"])
def test_payloads_that_are_not_canonical_are_rejected(mutation):
    symbols, freqs = _case(3, 40, 2000)
    words = encode_symbols(symbols, freqs)
    if mutation == "append":
        bad = np.append(words, np.uint32(0))
    elif mutation == "truncate":
        bad = words[:-1]
    else:
        bad = words.copy()
        bad[-1] ^= np.uint32(1)
    with pytest.raises(TqzError) as err:
        decode_symbols(bad, freqs, len(symbols))
    assert err.value.code == "BAD_PAYLOAD"
    with pytest.raises(ValueError):
        ref.decode(bad.tolist(), freqs.tolist(), len(symbols))


def test_random_garbage_never_escapes_as_a_foreign_exception():
    rng = np.random.default_rng(11)
    freqs = frequencies_from_counts(np.arange(1, 30))
    for _ in range(300):
        words = rng.integers(0, 1 << 32, size=int(rng.integers(1, 20)), dtype=np.uint64).astype(np.uint32)
        try:
            decode_symbols(words, freqs, int(rng.integers(1, 100)))
        except TqzError as e:
            assert e.code == "BAD_PAYLOAD"


def test_frequency_tables_are_valid_and_deterministic():
    rng = np.random.default_rng(5)
    for _ in range(50):
        counts = rng.integers(0, 10**6, size=int(rng.integers(2, 5000)))
        counts[rng.random(len(counts)) < 0.3] = 0
        f = frequencies_from_counts(counts)
        assert f.dtype == np.uint32 and f.min() >= 1 and int(f.sum()) == 1 << 24
        assert np.array_equal(f, frequencies_from_counts(counts.copy()))
    with pytest.raises(TqzError) as err:
        encode_symbols(np.array([0, 1]), np.array([1 << 24, 0]))
    assert err.value.code == "BAD_TABLE"


def test_many_tiny_chunks_build_the_range_coder_model_once(monkeypatch):
    """Building constriction's model for a 65536-symbol table costs ~200 us; built per chunk, a file
    of 36-byte chunks cost ~6 us of CPU per byte. It is built once per tensor."""
    import tqcodec.coding.rangecoder as rc
    a = 65536
    f = np.full(a, (1 << 24) // a, dtype=np.uint32)
    f[0] += (1 << 24) - int(f.sum())
    word = encode_symbols(np.array([1], dtype=np.int32), f).astype("<u4").tobytes()
    n = 500
    buf = io.BytesIO()
    w = ContainerWriter(buf)
    w.add_tensor(TensorRecord("u", "float32", (n,), "uniform", {"granularity": "tensor", "steps": [0],
                                                                "q_min": 0, "freqs": pack_freqs(f)}),
                 [[(1, word)] * n])
    w.finish({})
    built = []
    real = rc._model
    monkeypatch.setattr(rc, "_model", lambda freqs: built.append(1) or real(freqs))
    out = tqcodec.load(buf.getvalue())
    assert out["u"].shape == (n,) and float(out["u"][0]) == 1.0
    assert len(built) == 1
