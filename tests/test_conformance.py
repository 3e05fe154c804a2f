"""The conformance vectors (conformance/): tqcodec passes every one, the vectors are reproducible,
and the frozen fixtures still decode to what they decoded to when they were written."""
from __future__ import annotations

import hashlib
import importlib
import json
import subprocess
import struct
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conformance"
sys.path.insert(0, str(CONF))

run = importlib.import_module("run")
craft = importlib.import_module("craft")

VECTORS = run.find_vectors(CONF)
_DECODER = None


def decoder():
    global _DECODER
    if _DECODER is None:
        _DECODER = run.TqcodecDecoder()
    return _DECODER


def _id(v):
    return f"{v[0]}/{v[1].name}"


def test_vectors_exist():
    groups = {g for g, _, _ in VECTORS}
    assert {"valid", "invalid", "fixture"} <= groups, "run conformance/make_vectors.py"


@pytest.mark.parametrize("vector", VECTORS, ids=_id)
def test_tqcodec_passes(vector):
    """tqcodec claims conformance Level 2 (spec §12.1); vectors marked large (1 GiB outputs and more) run
    with ``conformance/run.py --large --level 2``."""
    group, folder, info = vector
    if info.get("large"):
        pytest.skip("large vector: conformance/run.py --decoder tqcodec --large --level 2")
    r = decoder().check(group, folder, info, level=2)
    assert r.ok, r.detail


@pytest.mark.parametrize("folder", sorted(p for p in (CONF / "fixtures").glob("v*/*") if p.is_dir()),
                         ids=lambda p: f"{p.parent.name}/{p.name}")
def test_fixture_is_frozen(folder):
    """A fixture's bytes never change (it is the file an old encoder wrote)."""
    info = json.loads((folder / "vector.json").read_text())
    assert hashlib.sha256((folder / "in.tqz").read_bytes()).hexdigest() == info["sha256"], \
        f"{folder} was modified: fixtures are never regenerated"


def test_make_vectors_is_reproducible(tmp_path):
    """Regenerating gives the committed bytes (valid/, invalid/, may_reject/, README.md)."""
    mv = importlib.import_module("make_vectors")
    mv.generate(tmp_path, CONF / "fixtures")
    diffs = []
    for group in ("valid", "invalid", "may_reject"):
        new = {p.relative_to(tmp_path) for p in (tmp_path / group).rglob("*") if p.is_file()}
        old = {p.relative_to(CONF) for p in (CONF / group).rglob("*") if p.is_file()}
        diffs += [f"only in a fresh run: {p}" for p in sorted(new - old)]
        diffs += [f"not made any more: {p}" for p in sorted(old - new)]
        diffs += [f"bytes differ: {p}" for p in sorted(new & old)
                  if (tmp_path / p).read_bytes() != (CONF / p).read_bytes()]
    if (tmp_path / "README.md").read_bytes() != (CONF / "README.md").read_bytes():
        diffs.append("README.md differs")
    assert not diffs, "conformance vectors are stale (review, then run conformance/make_vectors.py):\n" + \
        "\n".join(diffs[:40])


def test_every_vector_is_in_the_readme():
    readme = (CONF / "README.md").read_text()
    for group, folder, _ in VECTORS:
        label = f"{group}/{folder.name}" if group != "fixture" else f"fixtures/{folder.parent.name}/{folder.name}"
        assert f"`{label}`" in readme, label


def test_vector_json_fields():
    codes = set(importlib.import_module("tqcodec.errors").ERROR_CODES)
    for group, folder, info in VECTORS:
        assert info["what"] and info["spec"].startswith("§"), folder
        if group == "invalid":
            assert info["expect_error"] in codes, folder
            assert not (folder / "expected.safetensors").exists(), folder
        else:
            compact = "expected_compact" in info
            assert "tolerance" in info and (folder / "expected.safetensors").exists() != compact, folder
            assert (group == "may_reject") == ("may_reject_with" in info) == ("level" in info), folder
            assert info.get("level", 1) in (1, 2, 3) and (not info.get("large") or compact), folder


def test_expected_files_are_standard_safetensors():
    """The expected outputs read with the safetensors library itself (bf16 as BF16, uint16..64, bool)."""
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file
    for group, folder, info in VECTORS:
        if group == "invalid" or "expected_compact" in info:
            continue
        ours = craft.read_safetensors(folder / "expected.safetensors")
        if folder.name == "empty_tensor_huge_dims":  # torch has no shape [2^40, 2^40, 0] either
            continue
        theirs = load_file(str(folder / "expected.safetensors"))
        assert set(ours) == set(theirs), folder
        for name, (dt, shape, raw) in ours.items():
            t = theirs[name]
            assert tuple(t.shape) == shape, (folder, name)
            assert craft.ST_DTYPES[str(t.dtype).replace("torch.", "")] == dt, (folder, name)
            assert t.reshape(-1).contiguous().view(torch.uint8).numpy().tobytes() == raw, (folder, name)


def test_every_error_code_of_the_spec_has_a_vector():
    have = {info["expect_error"] for g, _, info in VECTORS if g == "invalid"}
    file_codes = {"TRUNCATED", "BAD_MAGIC", "UNSUPPORTED_VERSION", "UNKNOWN_REQUIRED_FEATURE",
                  "CHECKSUM_MISMATCH", "BAD_MANIFEST", "BAD_TENSOR_RECORD", "LIMIT_EXCEEDED", "BAD_CHUNK",
                  "UNKNOWN_CHUNK", "BAD_INDEX", "TRAILING_DATA", "UNKNOWN_MODE", "BAD_TABLE", "BAD_STEP",
                  "BAD_PAYLOAD"}
    # RESERVED_NONZERO: spec v1.0 defines no reserved field (conformance/SPEC_ISSUES.md)
    assert file_codes <= have, file_codes - have


def _run(*args):
    return subprocess.run([sys.executable, str(CONF / "run.py"), *args], capture_output=True, text=True,
                          timeout=300)


def test_run_py_protocol_with_external_commands(tmp_path):
    """run.py drives a command by the protocol: a decoder that rejects everything with one code fails
    the valid vectors and the invalid ones expecting another code, and the run exits non-zero."""
    fake = tmp_path / "fake.py"
    fake.write_text("import sys\nprint('nope', file=sys.stderr)\nprint(sys.argv[2] + ': no [BAD_MAGIC]', "
                    "file=sys.stderr)\nsys.exit(3)\n")
    p = _run("--decoder", f"{sys.executable} {fake}", "-k", "magic")
    assert p.returncode == 1, p.stdout + p.stderr
    assert "| FAIL |" in p.stdout
    p = _run("--decoder", f"{sys.executable} {fake}", "-k", "invalid/html_page")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "| 1 | 0 |" in p.stdout


def test_run_py_tqcodec_subset():
    p = _run("--decoder", "tqcodec", "-k", "raw_none")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "| tqcodec |" in p.stdout and "PASS" in p.stdout


def test_missing_refdec_is_skipped_not_passed():
    p = _run("--decoder", "refdec", "-k", "invalid/html_page")
    if run.REFDEC.exists():
        assert "| refdec |" in p.stdout
    else:
        assert "SKIPPED" in p.stdout and p.returncode == 0, p.stdout
        assert _run("--decoder", "refdec", "-k", "invalid/html_page", "--require").returncode == 1


def _manifest_and_minor(folder):
    data = (folder / "in.tqz").read_bytes()
    manifest, _ = craft.parse_valid(data)
    return manifest, struct.unpack_from("<H", data, 10)[0]


def test_files_declare_the_lowest_minor_version_they_need():
    """Spec §13: a file declares the lowest minor version defining every mode and feature it uses: 4
    with a tq tensor that has row_band (§7.5.1, 1.4), else 3
    with a compressed manifest (required feature bit 0, §5.0, 1.3), else 2 with an ecsq/kmeans/pq/dither
    tensor (1.2), else 1 with a tq tensor (1.1), else 0 (except the vectors testing a future minor
    version or a mismatched one). Fixtures of each version say that version."""
    lineage = {"ecsq", "kmeans", "pq", "dither"}
    seen = {0: 0, 1: 0, 2: 0, 3: 0, 4: 0}
    for group, folder, _ in VECTORS:
        if group == "invalid":
            continue
        manifest, minor = _manifest_and_minor(folder)
        modes = {r["mode"] for r in manifest["tensors"]}
        compressed = struct.unpack_from("<I", (folder / "in.tqz").read_bytes(), 12)[0] & 1
        row_band = any(r["mode"] == "tq" and "row_band" in r["params"] for r in manifest["tensors"])
        want = 4 if row_band else 3 if compressed else 2 if modes & lineage else 1 if "tq" in modes else 0
        if folder.name not in ("future_minor_and_optional_features", "manifest_zstd_minor_0"):
            assert minor == want, (folder, minor)
            seen[want] += 1
    assert seen[1] >= 20 and seen[2] >= 20 and seen[0] >= 20 and seen[3] >= 10 and seen[4] >= 5
    for version, minor in (("v1.1", 1), ("v1.2", 2), ("v1.3", 3), ("v1.4", 4)):
        for folder in sorted((CONF / "fixtures" / version).glob("*")):
            manifest, got = _manifest_and_minor(folder)
            assert got == minor, folder


def test_tolerance_vectors_have_per_element_bounds():
    """Valid vectors with a tolerance (tq with a float16 transform, spec/mode-tq.md §7.5.3) carry a bounds
    file with the names and shapes of expected.safetensors; every other valid vector is bit-exact."""
    n = 0
    for group, folder, info in VECTORS:
        if group == "invalid":
            continue
        tol = info["tolerance"]
        manifest, _ = _manifest_and_minor(folder)
        has_transform = any(r["mode"] == "tq" and r["params"].get("transform") == "float16"
                            for r in manifest["tensors"])
        assert (tol != 0) == has_transform, folder
        if tol == 0:
            continue
        n += 1
        if "expected_compact" in info:  # the bounds of each transform tensor's row
            rows = [e for e in info["expected_compact"].values() if "tolerance_row_hex" in e]
            assert rows and set(tol) == {"abs", "rel"}, folder
            assert all(len(e["tolerance_row_hex"]) == 16 * e["row_elems"] for e in rows), folder
            continue
        want = craft.read_safetensors(folder / "expected.safetensors")
        bounds = craft.read_safetensors(folder / tol["abs_per_element"])
        assert set(bounds) == set(want), folder
        for name, (dt, shape, raw) in bounds.items():
            assert dt == "F64" and shape == want[name][1], (folder, name)
    assert n >= 5


def test_compare_applies_per_element_bounds():
    import numpy as np
    want = {"x": ("F32", (2,), np.array([1.0, 1.0], "<f4").tobytes())}
    got = {"x": ("F32", (2,), np.array([1.0, 1.001], "<f4").tobytes())}
    tol = {"abs": 0.0, "rel": 2.0 ** -23, "abs_per_element": "tolerance.safetensors"}
    assert run.compare(want, got, tol) is not None
    assert run.compare(want, got, tol, {"x": np.array([0.0, 0.002])}) is None
    assert run.compare(want, got, tol, {"x": np.array([0.002, 0.0])}) is not None


def test_levels_decide_which_refusals_pass():
    """A may_reject vector's LIMIT_EXCEEDED passes only for a decoder claiming less than its level; another
    may_reject_with passes at every level; a valid vector never passes a refusal."""
    refused = ("error", "LIMIT_EXCEEDED", "too big")
    mr = {"may_reject_with": "LIMIT_EXCEEDED", "level": 2}
    assert run.judge("may_reject", mr, Path("."), refused, level=1).ok
    assert not run.judge("may_reject", mr, Path("."), refused, level=2).ok
    zstd = {"may_reject_with": "BAD_PAYLOAD", "level": 1}
    assert run.judge("may_reject", zstd, Path("."), ("error", "BAD_PAYLOAD", "window"), level=3).ok
    assert not run.judge("may_reject", zstd, Path("."), refused, level=1).ok
    assert not run.judge("valid", {"tolerance": 0}, Path("."), refused, level=1).ok


def test_compare_compact_streams_rows():
    import numpy as np
    row = np.array([1.0, -2.0, 0.5], "<f2")
    want = {"x": {"dtype": "F16", "shape": [4, 3], "row_hex": row.tobytes().hex(), "row_elems": 3},
            "c": {"dtype": "U8", "shape": [5], "row_hex": "07", "row_elems": 1}}
    good = [("c", "U8", (5,), np.full(5, 7, np.uint8)), ("x", "F16", (4, 3), np.tile(row, 4).tobytes())]
    assert run.compare_compact(want, iter(good), 0) is None
    bad = np.tile(row, 4)
    bad[10] = 0.25
    why = run.compare_compact(want, iter([good[0], ("x", "F16", (4, 3), bad)]), 0)
    assert "element 10" in why
    assert "missing" in run.compare_compact(want, iter(good[:1]), 0)
    assert "shape" in run.compare_compact(want, iter([("c", "U8", (6,), np.full(6, 7, np.uint8))]), 0)
    # with a tolerance: the row's bounds apply to every repetition
    bound = np.array([0.0, 0.0, 0.3])
    want["x"]["tolerance_row_hex"] = bound.astype("<f8").tobytes().hex()
    near = np.tile(row, 4)
    near[11] = 0.75
    assert run.compare_compact(want, iter([good[0], ("x", "F16", (4, 3), near)]), {"abs": 0, "rel": 0}) is None
    near[9] = 1.5
    assert "element 9" in run.compare_compact(want, iter([good[0], ("x", "F16", (4, 3), near)]),
                                              {"abs": 0, "rel": 0})


def test_large_vectors_are_skipped_unless_asked():
    large = [f"{g}/{f.name}" for g, f, info in VECTORS if info.get("large")]
    assert large  # and each is small on disk: the expectation is compact
    for g, f, info in VECTORS:
        if info.get("large"):
            assert not (f / "expected.safetensors").exists() and (f / "in.tqz").stat().st_size < 3 << 20
    p = _run("--decoder", "tqcodec", "-k", "over_level1")
    assert p.returncode == 1 and "large vectors skipped" in p.stderr, p.stdout + p.stderr
