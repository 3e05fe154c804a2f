"""The readers of tqcodec.format.reader (front to back through ``load``, random access through
``open``) on hostile files (issue 8): every fuzzed, mutated or spliced file ends in tensors or a
``TqzError`` with a file-validity code of spec §11, fast and small, and ``load`` and ``open`` agree.
The generators and the per-case check are the harness in ``tests/fuzzing.py``.
"""
from __future__ import annotations

import random
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fuzzing import check_case, fields, fix_crcs, mutate, seed_files, structured_files


# --- mutated and spliced encoder output -------------------------------------------------------

def test_seeds_decode_and_agree():
    for s in seed_files():
        assert check_case(s) == "ok"


@pytest.mark.parametrize("seed", range(8))
def test_mutation_fuzz(seed):
    """300 mutated files per seed, 2400 in all."""
    rng = random.Random(1000 + seed)
    seeds = seed_files()
    counts: dict[str, int] = {}
    for _ in range(300):
        data = mutate(rng.choice(seeds), rng, seeds)
        label = check_case(data)
        counts[label] = counts.get(label, 0) + 1
    assert sum(counts.values()) == 300
    assert len(counts) >= 3, counts  # the mutator reaches past the first check


def test_boundary_values_in_every_field():
    """Every length/count/offset field of every seed set to every boundary value, CRCs fixed."""
    n = 0
    seeds = seed_files()
    for s in (seeds[0], seeds[2], seeds[3], seeds[4]):
        for off, size in fields(s):
            for v in (0, 1, (1 << 32) - 1, (1 << 64) - 1):
                b = bytearray(s)
                b[off:off + size] = (v % (1 << (8 * size))).to_bytes(size, "little")
                check_case(fix_crcs(bytes(b)))
                n += 1
    assert n > 500


def test_splices_of_two_files():
    seeds = seed_files()
    rng = random.Random(7)
    for _ in range(200):
        a, b = rng.choice(seeds), rng.choice(seeds)
        cut_a, cut_b = rng.randrange(len(a) + 1), rng.randrange(len(b) + 1)
        data = a[:cut_a] + b[cut_b:]
        check_case(data)
        check_case(fix_crcs(data))


# --- structured files (hypothesis) ----------------------------------------------------------

@settings(max_examples=500, derandomize=True, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(structured_files())
def test_structured_files(data):
    check_case(data)


@settings(max_examples=300, derandomize=True, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 4), st.randoms(use_true_random=False))
def test_mutation_fuzz_hypothesis(which, rnd):
    """The mutator under hypothesis, so a failure shrinks to a short reproducer."""
    seeds = seed_files()
    check_case(mutate(seeds[which], random.Random(rnd.random()), seeds))


# --- crashers found by the fuzzers (tests/data/crashers/, see its README) --------------------

def test_crashers_stay_fixed():
    folder = Path(__file__).resolve().parents[1] / "data" / "crashers"
    files = sorted(folder.glob("*.tqz"))
    assert files, "tests/data/crashers/ is empty"
    for f in files:
        label = check_case(f.read_bytes())
        assert label != "ok", f"{f.name} decodes, but it is an invalid file"
