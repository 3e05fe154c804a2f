#!/usr/bin/env python3
"""Run .tqz decoders over the conformance vectors and print a pass/fail table.

    python conformance/run.py                          # every available decoder
    python conformance/run.py --decoder tqcodec        # tqcodec in process
    python conformance/run.py --decoder refdec         # python conformance/refdec/refdec.py
    python conformance/run.py --decoder "CMD ARGS"     # any command following the protocol
    python conformance/run.py -k zstd -v               # only vectors whose path contains "zstd", verbose
    python conformance/run.py --level 2 --large        # a Level 2 decoder (spec §12.1), large vectors too

Protocol for an external decoder (see README.md): ``CMD decode IN.tqz OUT.safetensors``; exit
status 0 and OUT written on success; on rejection a non-zero exit status and the spec §11 error
code in brackets at the end of the last stderr line, e.g. ``... [BAD_INDEX]``.

A tensor named ``__metadata__`` is written under the key ``/__metadata__`` (spec §5.4).

``--level N`` (default 1) is the conformance level of spec §12.1 the decoders claim: a
``may_reject/`` vector whose ``level`` is at most N must decode; one above N may also be refused
with exactly its ``may_reject_with``. (A ``may_reject_with`` other than ``LIMIT_EXCEEDED`` is allowed
at every level: the spec lets a decoder choose.) Vectors marked ``large`` (outputs of 1 GiB and more,
compared against ``expected_compact``) run only with ``--large``.

Exit status: 0 if every decoder run passed every vector, 1 otherwise (a decoder reported as
"skipped" is not a pass and does not fail the run; ``--require`` makes it fail).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from craft import ST_DTYPES, ST_NUMPY, iter_safetensors, read_safetensors  # noqa: E402

REFDEC = HERE / "refdec" / "refdec.py"
CODE_RE = re.compile(r"\[([A-Z_]+)\]\s*$")


# --- vectors ---------------------------------------------------------------------------------------

def find_vectors(root: Path, pattern: str = "") -> list[tuple[str, Path, dict]]:
    """(group, folder, vector.json) of every vector: valid, invalid, may_reject, fixtures/*."""
    out = []
    for group, base in (("valid", root / "valid"), ("invalid", root / "invalid"),
                        ("may_reject", root / "may_reject")):
        if base.is_dir():
            for d in sorted(base.iterdir()):
                if (d / "vector.json").exists():
                    out.append((group, d, json.loads((d / "vector.json").read_text())))
    fx = root / "fixtures"
    if fx.is_dir():
        for d in sorted(fx.glob("v*/*")):
            if (d / "vector.json").exists():
                out.append(("fixture", d, json.loads((d / "vector.json").read_text())))
    return [v for v in out if pattern in str(v[1].relative_to(root))]


def compare(expected: dict, got: dict, tolerance, bounds: dict | None = None) -> str | None:
    """None if ``got`` matches ``expected`` ({name: (ST dtype, shape, bytes)}), else why not. ``bounds``:
    {name: float64 array} added to the allowed difference element by element (the tolerance's
    ``abs_per_element`` file)."""
    if set(got) != set(expected):
        missing = sorted(set(expected) - set(got))[:3]
        extra = sorted(set(got) - set(expected))[:3]
        return f"tensor names differ (missing {missing}, unexpected {extra})"
    for name, (dt, shape, raw) in expected.items():
        gdt, gshape, graw = got[name]
        if gdt != dt:
            return f"{name!r}: dtype {gdt}, expected {dt}"
        if tuple(gshape) != tuple(shape):
            return f"{name!r}: shape {list(gshape)}, expected {list(shape)}"
        if graw == raw:
            continue
        if not tolerance or dt not in ("F64", "F32", "F16", "BF16"):
            a = np.frombuffer(raw, ST_NUMPY[dt])
            b = np.frombuffer(graw, ST_NUMPY[dt]) if len(graw) == len(raw) else None
            if b is None:
                return f"{name!r}: {len(graw)} bytes, expected {len(raw)}"
            i = int(np.flatnonzero(a != b)[0]) if a.size == b.size and (a != b).any() else 0
            return f"{name!r}: differs at element {i} (got {b[i]!r}, expected {a[i]!r}; bit-exact required)"
        want, have = _as_f64(dt, raw), _as_f64(dt, graw)
        tol = tolerance.get("abs", 0) + tolerance.get("rel", 0) * np.abs(want)
        if bounds and name in bounds:
            tol = tol + np.asarray(bounds[name], dtype=np.float64).reshape(-1)
        ok = (np.abs(want - have) <= tol) | (np.isnan(want) & np.isnan(have)) | (want == have)
        if not ok.all():
            i = int(np.flatnonzero(~ok)[0])
            return f"{name!r}: element {i} is {have[i]}, expected {want[i]} within {tolerance}"
    return None


def _as_f64(dt: str, raw) -> np.ndarray:
    a = np.frombuffer(raw, ST_NUMPY[dt])
    if dt == "BF16":
        return (a.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    return a.astype(np.float64)


COMPACT_BLOCK = 1 << 24  # bytes of output compared at a time


def compare_compact(compact: dict, items, tolerance) -> str | None:
    """None if the tensors ``items`` ((name, ST dtype, shape, bytes-like or array) in any order, each
    compared as it comes and then dropped) match ``compact`` (vector.json's ``expected_compact``:
    {name: {"dtype", "shape", "row_hex", "row_elems"[, "tolerance_row_hex"]}}, each tensor its row
    repeated), else why not."""
    seen = set()
    for name, dt, shape, buf in items:
        if name in seen:
            return f"tensor {name!r} twice"
        seen.add(name)
        if name not in compact:
            return f"unexpected tensor {name!r}"
        why = _compare_rows(name, compact[name], dt, shape, buf, tolerance)
        if why:
            return why
    missing = sorted(set(compact) - seen)
    return f"tensor names differ (missing {missing[:3]})" if missing else None


def _compare_rows(name: str, want: dict, dt: str, shape, buf, tolerance) -> str | None:
    if dt != want["dtype"]:
        return f"{name!r}: dtype {dt}, expected {want['dtype']}"
    if tuple(shape) != tuple(want["shape"]):
        return f"{name!r}: shape {list(shape)}, expected {want['shape']}"
    a = buf.reshape(-1).view(np.uint8) if isinstance(buf, np.ndarray) else np.frombuffer(buf, np.uint8)
    row = np.frombuffer(bytes.fromhex(want["row_hex"]), np.uint8)
    numel = 1
    for d in shape:
        numel *= int(d)
    if a.size != numel * np.dtype(ST_NUMPY[dt]).itemsize:
        return f"{name!r}: {a.size} bytes, expected {numel * np.dtype(ST_NUMPY[dt]).itemsize}"
    if not a.size:
        return None
    width = row.size
    want64 = _as_f64(dt, row.tobytes())
    bound = (np.frombuffer(bytes.fromhex(want["tolerance_row_hex"]), "<f8") if "tolerance_row_hex" in want
             else np.zeros(want64.size))
    step = max(1, COMPACT_BLOCK // width) * width
    for start in range(0, a.size, step):
        block = np.asarray(a[start:start + step]).reshape(-1, width)
        same = (block == row).all(axis=1)
        if same.all():
            continue
        r = int(np.flatnonzero(~same)[0])
        if not tolerance or dt not in ("F64", "F32", "F16", "BF16"):
            got = np.frombuffer(block[r].tobytes(), ST_NUMPY[dt])
            j = int(np.flatnonzero(got != np.frombuffer(row.tobytes(), ST_NUMPY[dt]))[0])
            return (f"{name!r}: differs at element {(start // width + r) * want64.size + j} (got {got[j]!r}, "
                    f"expected {np.frombuffer(row.tobytes(), ST_NUMPY[dt])[j]!r}; bit-exact required)")
        have = _as_f64(dt, np.ascontiguousarray(block).tobytes()).reshape(-1, want64.size)
        tol = tolerance.get("abs", 0) + tolerance.get("rel", 0) * np.abs(want64) + bound
        ok = (np.abs(want64 - have) <= tol) | (np.isnan(want64) & np.isnan(have)) | (want64 == have)
        if not ok.all():
            i = int(np.flatnonzero(~ok.reshape(-1))[0])
            return (f"{name!r}: element {start // width * want64.size + i} is {have.reshape(-1)[i]}, expected "
                    f"{want64[i % want64.size]} within {tolerance}")
    return None


# --- decoders ---------------------------------------------------------------------------------------

class Result:
    def __init__(self, ok: bool, detail: str = "", note: str = ""):
        self.ok, self.detail, self.note = ok, detail, note


def judge(group: str, info: dict, folder: Path, outcome, level: int = 1) -> Result:
    """``outcome``: ("ok", {name: (dt, shape, bytes)}), ("checked", None or why not) for a decoder that
    compared its output itself (``compare_compact``), or ("error", code or None, message). ``level``: the
    conformance level (spec §12.1) the decoder claims."""
    if group == "invalid":
        want = info["expect_error"]
        if outcome[0] != "error":
            return Result(False, f"accepted; expected {want}")
        if outcome[1] != want:
            return Result(False, f"rejected with {outcome[1]}, expected {want} ({outcome[2][-160:]})")
        return Result(True)
    if outcome[0] == "error":
        allowed = info.get("may_reject_with")
        if allowed and outcome[1] == allowed:
            if allowed != "LIMIT_EXCEEDED" or info.get("level", 1) > level:
                return Result(True, note=f"refused with {outcome[1]} (allowed)")
            return Result(False, f"refused with {outcome[1]}, but the file is within Level {info.get('level', 1)} "
                                 f"and the decoder claims Level {level}: {outcome[2][-160:]}")
        return Result(False, f"rejected with {outcome[1]}: {outcome[2][-200:]}")
    if outcome[0] == "checked":
        return Result(outcome[1] is None, outcome[1] or "")
    tolerance = info.get("tolerance", 0)
    if "expected_compact" in info:
        why = compare_compact(info["expected_compact"], ((n, *v) for n, v in outcome[1].items()), tolerance)
        return Result(why is None, why or "")
    bounds = None
    if isinstance(tolerance, dict) and tolerance.get("abs_per_element"):
        bounds = {n: np.frombuffer(raw, "<f8") for n, (_, _, raw) in
                  read_safetensors(folder / tolerance["abs_per_element"]).items()}
    why = compare(read_safetensors(folder / "expected.safetensors"), outcome[1], tolerance, bounds)
    return Result(why is None, why or "")


class TqcodecDecoder:
    """tqcodec in process: front to back from the path, from a non-seekable stream, by random access, and
    (valid files) by random access from 4 threads; a vector with ``expected_compact`` once, front to back,
    each tensor compared as it comes. Names are mapped as the protocol writes them (tqcodec's
    ``safetensors_key``: ``__metadata__`` -> ``/__metadata__``)."""

    name = "tqcodec"

    def __init__(self):
        sys.path.insert(0, str(ROOT))
        import tqcodec  # noqa: F401
        from tqcodec.io.files import safetensors_key
        self.tq = tqcodec
        self.key = safetensors_key

    @staticmethod
    def _storage(t):
        from tqcodec.pipeline.tensors import tensor_to_storage
        dtype, arr = tensor_to_storage(t)
        return ST_DTYPES[dtype], tuple(t.shape), np.ascontiguousarray(arr)

    @classmethod
    def _tensor(cls, t):
        dt, shape, arr = cls._storage(t)
        return dt, shape, arr.tobytes()

    def _run(self, fn):
        try:
            return ("ok", fn())
        except self.tq.TqzError as exc:
            return ("error", exc.code, str(exc))
        except Exception as exc:  # a crash is never a valid rejection
            return ("error", f"CRASH:{type(exc).__name__}", f"{type(exc).__name__}: {exc}")

    def check(self, group: str, folder: Path, info: dict, level: int = 1) -> Result:
        path = folder / "in.tqz"
        tq, key = self.tq, self.key

        if "expected_compact" in info:  # outputs too large to hold several times: decode once
            def compact():
                items = ((key(n), *self._storage(t)) for n, t in tq.iter_tensors(path))
                return compare_compact(info["expected_compact"], items, info.get("tolerance", 0))
            out = self._run(compact)
            return judge(group, info, folder, ("checked", out[1]) if out[0] == "ok" else out, level)

        def seq():
            return {key(n): self._tensor(t) for n, t in tq.iter_tensors(path)}

        def stream():
            with open(path, "rb") as f:
                return {key(n): self._tensor(t) for n, t in tq.iter_tensors(NonSeekable(f))}

        def random_access():
            with tq.open(path) as f:
                return {key(n): self._tensor(f.get_tensor(n)) for n in f.keys()}

        def random_access_threads():
            from concurrent.futures import ThreadPoolExecutor
            with tq.open(path) as f, ThreadPoolExecutor(4) as pool:
                keys = f.keys()[::-1]  # last tensor first, several at once from one open file
                return dict(zip(map(key, keys), pool.map(lambda n: self._tensor(f.get_tensor(n)), keys)))

        parts = {"seq": judge(group, info, folder, self._run(seq), level),
                 "stream": judge(group, info, folder, self._run(stream), level)}
        ra_out = self._run(random_access)
        ra = judge(group, info, folder, ra_out, level)
        if group == "invalid" and not ra.ok:
            # spec §10.2: a seeking decoder checks only what it reads; a crash is still a failure
            if ra_out[0] == "error" and ra_out[1].startswith("CRASH"):
                parts["ra"] = ra
            else:
                ra = Result(True, note=f"random access: {ra.detail}")
                parts["ra"] = ra
        else:
            parts["ra"] = ra
        if group != "invalid":
            parts["ra_threads"] = judge(group, info, folder, self._run(random_access_threads), level)
        bad = [f"{k}: {r.detail}" for k, r in parts.items() if not r.ok]
        notes = [r.note for r in parts.values() if r.note]
        return Result(not bad, "; ".join(bad), "; ".join(notes))


class NonSeekable(io.RawIOBase):
    """A pipe-like reader: read() only, short reads, no seek/tell/fileno."""

    def __init__(self, f):
        self._f = f

    def readable(self):
        return True

    def seekable(self):
        return False

    def readinto(self, b):
        data = self._f.read(min(len(b), 4093))
        b[:len(data)] = data
        return len(data)


class CommandDecoder:
    """An external decoder following the protocol (``argv decode IN OUT``), or any command line given as
    a ``template`` with ``{in}`` and ``{out}`` in it."""

    def __init__(self, name: str, argv: list[str], timeout: float = 120.0, template: list[str] | None = None):
        self.name, self.argv, self.timeout = name, argv, timeout
        self.template = template or argv + ["decode", "{in}", "{out}"]

    def check(self, group: str, folder: Path, info: dict, level: int = 1) -> Result:
        timeout = self.timeout * (10 if info.get("large") else 1)
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "out.safetensors"
            cmd = [a.replace("{in}", str(folder / "in.tqz")).replace("{out}", str(out)) for a in self.template]
            try:
                p = subprocess.run(cmd, capture_output=True, timeout=timeout)
            except subprocess.TimeoutExpired:
                return Result(False, f"timed out after {timeout:.0f} s")
            err = p.stderr.decode("utf-8", "replace").strip()
            if p.returncode == 0:
                if not out.exists():
                    return judge(group, info, folder, ("error", "NO_OUTPUT", "exit 0 but no output file"), level)
                try:
                    if "expected_compact" in info:  # streamed from the output, memory-mapped
                        why = compare_compact(info["expected_compact"], iter_safetensors(out),
                                              info.get("tolerance", 0))
                        return judge(group, info, folder, ("checked", why), level)
                    tensors = read_safetensors(out)
                except Exception as exc:
                    return Result(False, f"unreadable output: {exc}")
                return judge(group, info, folder, ("ok", tensors), level)
            last = err.splitlines()[-1] if err else ""
            m = CODE_RE.search(last)
            code = m.group(1) if m else f"NO_CODE(exit {p.returncode})"
            return judge(group, info, folder, ("error", code, last), level)


def decoders_from_args(names: list[str]):
    out, skipped = [], []
    for n in names:
        if n == "tqcodec":
            out.append(TqcodecDecoder())
        elif n == "tqz-cli":  # tqcodec's command line: tqz decode IN -o OUT.safetensors --force
            out.append(CommandDecoder("tqz-cli", [], template=[sys.executable, "-m", "tqcodec", "decode", "{in}",
                                                               "-o", "{out}", "--force"]))
        elif n == "refdec":
            if REFDEC.exists():
                out.append(CommandDecoder("refdec", [sys.executable, str(REFDEC)]))
            else:
                skipped.append(("refdec", f"{REFDEC.relative_to(ROOT)} does not exist"))
        else:
            out.append(CommandDecoder(n, shlex.split(n)))
    return out, skipped


def run(decoders, vectors, verbose=False, stream=sys.stdout, jobs=1, level=1):
    """Returns {decoder name: (passed, failed, seconds, failures, notes)}. External decoders run
    ``jobs`` vectors at a time; every decoder is judged as claiming conformance ``level``."""
    from concurrent.futures import ThreadPoolExecutor
    summary = {}
    for dec in decoders:
        t0 = time.time()
        failures, notes, passed = [], [], 0
        if isinstance(dec, CommandDecoder) and jobs > 1:
            with ThreadPoolExecutor(jobs) as pool:
                results = list(pool.map(lambda v: dec.check(*v, level), vectors))
        else:
            results = (dec.check(*v, level) for v in vectors)
        for (group, folder, info), r in zip(vectors, results):
            label = f"{group}/{folder.name}" if group != "fixture" else f"fixtures/{folder.parent.name}/{folder.name}"
            if r.ok:
                passed += 1
                if r.note:
                    notes.append((label, r.note))
            else:
                failures.append((label, r.detail))
            if verbose:
                exp = info.get("expect_error", "decodes")
                print(f"  {dec.name:8} {'PASS' if r.ok else 'FAIL'}  {label:60} {exp}"
                      + (f"  -- {r.detail}" if not r.ok else "") + (f"  ({r.note})" if r.note else ""), file=stream)
        summary[dec.name] = (passed, len(failures), time.time() - t0, failures, notes)
    return summary


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Run .tqz decoders over the conformance vectors.")
    ap.add_argument("--decoder", action="append", help="tqcodec, refdec, tqz-cli (tqcodec's command line, "
                    "slow), or a command (repeatable); default: tqcodec and refdec")
    ap.add_argument("-j", "--jobs", type=int, default=os.cpu_count() or 1,
                    help="vectors decoded at once by an external decoder (default: CPU count)")
    ap.add_argument("--root", type=Path, default=HERE, help="folder holding valid/, invalid/, fixtures/")
    ap.add_argument("-k", default="", help="only vectors whose path contains this string")
    ap.add_argument("-v", "--verbose", action="store_true", help="one line per vector")
    ap.add_argument("--notes", action="store_true", help="print random-access notes")
    ap.add_argument("--require", action="store_true", help="a skipped decoder fails the run")
    ap.add_argument("--level", type=int, default=1, choices=(1, 2, 3),
                    help="the conformance level (spec §12.1) the decoders claim (default 1): may_reject vectors "
                    "of that level or lower must decode")
    ap.add_argument("--large", action="store_true", help="also run the vectors marked large (outputs of 1 GiB "
                    "and more; minutes and several GiB of memory per decoder)")
    a = ap.parse_args(argv)
    vectors = find_vectors(a.root, a.k)
    large = [v for v in vectors if v[2].get("large")]
    if not a.large:
        vectors = [v for v in vectors if not v[2].get("large")]
    if not vectors:
        print("no vectors found" + (f" ({len(large)} large vectors skipped: --large runs them)" if large else ""),
              file=sys.stderr)
        return 1
    decs, skipped = decoders_from_args(a.decoder or ["tqcodec", "refdec"])
    summary = run(decs, vectors, a.verbose, jobs=a.jobs, level=a.level)
    counts = {g: sum(1 for v in vectors if v[0] == g) for g in ("valid", "invalid", "may_reject", "fixture")}
    print(f"\n{len(vectors)} vectors ({counts['valid']} valid, {counts['invalid']} invalid, "
          f"{counts['may_reject']} may-reject, {counts['fixture']} fixtures), decoders judged at Level {a.level}"
          + (f"; {len(large)} large vectors {'included' if a.large else 'skipped (--large runs them)'}"
             if large else "") + "\n")
    print(f"| decoder | passed | failed | time | result |\n|---|---|---|---|---|")
    failed = False
    for name, (p, f, secs, failures, notes) in summary.items():
        print(f"| {name} | {p} | {f} | {secs:.1f} s | {'PASS' if not f else 'FAIL'} |")
        failed |= bool(f)
    for name, why in skipped:
        print(f"| {name} | - | - | - | SKIPPED ({why}) |")
    for name, (p, f, secs, failures, notes) in summary.items():
        if failures:
            print(f"\n{name} failures:")
            for label, why in failures:
                print(f"  FAIL {label}: {why}")
        if notes and a.notes:
            print(f"\n{name} notes (not failures):")
            for label, why in notes:
                print(f"  note {label}: {why}")
        elif notes:
            print(f"\n{name}: {len(notes)} notes (not failures: random access naming another code, allowed "
                  "refusals; --notes to list)")
    return 1 if failed or (a.require and skipped) else 0


if __name__ == "__main__":
    sys.exit(main())
