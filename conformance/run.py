#!/usr/bin/env python3
"""Run .tqz decoders over the conformance vectors and print a pass/fail table.

    python conformance/run.py                          # every available decoder
    python conformance/run.py --decoder tqcodec        # tqcodec in process
    python conformance/run.py --decoder refdec         # python conformance/refdec/refdec.py
    python conformance/run.py --decoder "CMD ARGS"     # any command following the protocol
    python conformance/run.py -k zstd -v               # only vectors whose path contains "zstd", verbose

Protocol for an external decoder (see README.md): ``CMD decode IN.tqz OUT.safetensors``; exit
status 0 and OUT written on success; on rejection a non-zero exit status and the spec §11 error
code in brackets at the end of the last stderr line, e.g. ``... [BAD_INDEX]``.

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

from craft import ST_DTYPES, ST_NUMPY, read_safetensors  # noqa: E402

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


def _as_f64(dt: str, raw: bytes) -> np.ndarray:
    a = np.frombuffer(raw, ST_NUMPY[dt])
    if dt == "BF16":
        return (a.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    return a.astype(np.float64)


# --- decoders ---------------------------------------------------------------------------------------

class Result:
    def __init__(self, ok: bool, detail: str = "", note: str = ""):
        self.ok, self.detail, self.note = ok, detail, note


def judge(group: str, info: dict, folder: Path, outcome) -> Result:
    """``outcome``: ("ok", {name: (dt, shape, bytes)}) or ("error", code or None, message)."""
    if group == "invalid":
        want = info["expect_error"]
        if outcome[0] == "ok":
            return Result(False, f"accepted; expected {want}")
        if outcome[1] != want:
            return Result(False, f"rejected with {outcome[1]}, expected {want} ({outcome[2][-160:]})")
        return Result(True)
    if outcome[0] == "error":
        if info.get("may_reject_with") and outcome[1] == info["may_reject_with"]:
            return Result(True, note=f"refused with {outcome[1]} (allowed)")
        return Result(False, f"rejected with {outcome[1]}: {outcome[2][-200:]}")
    tolerance = info.get("tolerance", 0)
    bounds = None
    if isinstance(tolerance, dict) and tolerance.get("abs_per_element"):
        bounds = {n: np.frombuffer(raw, "<f8") for n, (_, _, raw) in
                  read_safetensors(folder / tolerance["abs_per_element"]).items()}
    why = compare(read_safetensors(folder / "expected.safetensors"), outcome[1], tolerance, bounds)
    return Result(why is None, why or "")


class TqcodecDecoder:
    """tqcodec in process: front to back from the path, from a non-seekable stream, by random access, and
    (valid files) by random access from 4 threads."""

    name = "tqcodec"

    def __init__(self):
        sys.path.insert(0, str(ROOT))
        import tqcodec  # noqa: F401
        self.tq = tqcodec

    @staticmethod
    def _tensor(t):
        from tqcodec.pipeline.tensors import tensor_to_storage
        dtype, arr = tensor_to_storage(t)
        return ST_DTYPES[dtype], tuple(t.shape), np.ascontiguousarray(arr).tobytes()

    def _run(self, fn):
        try:
            return ("ok", fn())
        except self.tq.TqzError as exc:
            return ("error", exc.code, str(exc))
        except Exception as exc:  # a crash is never a valid rejection
            return ("error", f"CRASH:{type(exc).__name__}", f"{type(exc).__name__}: {exc}")

    def check(self, group: str, folder: Path, info: dict) -> Result:
        path = folder / "in.tqz"
        tq = self.tq

        def seq():
            return {n: self._tensor(t) for n, t in tq.iter_tensors(path)}

        def stream():
            with open(path, "rb") as f:
                return {n: self._tensor(t) for n, t in tq.iter_tensors(NonSeekable(f))}

        def random_access():
            with tq.open(path) as f:
                return {n: self._tensor(f.get_tensor(n)) for n in f.keys()}

        def random_access_threads():
            from concurrent.futures import ThreadPoolExecutor
            with tq.open(path) as f, ThreadPoolExecutor(4) as pool:
                keys = f.keys()[::-1]  # last tensor first, several at once from one open file
                return dict(zip(keys, pool.map(lambda n: self._tensor(f.get_tensor(n)), keys)))

        parts = {"seq": judge(group, info, folder, self._run(seq)),
                 "stream": judge(group, info, folder, self._run(stream))}
        ra_out = self._run(random_access)
        ra = judge(group, info, folder, ra_out)
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
            parts["ra_threads"] = judge(group, info, folder, self._run(random_access_threads))
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

    def check(self, group: str, folder: Path, info: dict) -> Result:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "out.safetensors"
            cmd = [a.replace("{in}", str(folder / "in.tqz")).replace("{out}", str(out)) for a in self.template]
            try:
                p = subprocess.run(cmd, capture_output=True, timeout=self.timeout)
            except subprocess.TimeoutExpired:
                return Result(False, f"timed out after {self.timeout:.0f} s")
            err = p.stderr.decode("utf-8", "replace").strip()
            if p.returncode == 0:
                if not out.exists():
                    return judge(group, info, folder, ("error", "NO_OUTPUT", "exit 0 but no output file"))
                try:
                    tensors = read_safetensors(out)
                except Exception as exc:
                    return Result(False, f"unreadable output: {exc}")
                return judge(group, info, folder, ("ok", tensors))
            last = err.splitlines()[-1] if err else ""
            m = CODE_RE.search(last)
            code = m.group(1) if m else f"NO_CODE(exit {p.returncode})"
            return judge(group, info, folder, ("error", code, last))


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


def run(decoders, vectors, verbose=False, stream=sys.stdout, jobs=1):
    """Returns {decoder name: (passed, failed, seconds, failures, notes)}. External decoders run
    ``jobs`` vectors at a time."""
    from concurrent.futures import ThreadPoolExecutor
    summary = {}
    for dec in decoders:
        t0 = time.time()
        failures, notes, passed = [], [], 0
        if isinstance(dec, CommandDecoder) and jobs > 1:
            with ThreadPoolExecutor(jobs) as pool:
                results = list(pool.map(lambda v: dec.check(*v), vectors))
        else:
            results = (dec.check(*v) for v in vectors)
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
    a = ap.parse_args(argv)
    vectors = find_vectors(a.root, a.k)
    if not vectors:
        print("no vectors found", file=sys.stderr)
        return 1
    decs, skipped = decoders_from_args(a.decoder or ["tqcodec", "refdec"])
    summary = run(decs, vectors, a.verbose, jobs=a.jobs)
    counts = {g: sum(1 for v in vectors if v[0] == g) for g in ("valid", "invalid", "may_reject", "fixture")}
    print(f"\n{len(vectors)} vectors ({counts['valid']} valid, {counts['invalid']} invalid, "
          f"{counts['may_reject']} may-reject, {counts['fixture']} fixtures)\n")
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
