"""Extend the MiniLM benchmark's calibration pool (``sentences.json``) with ordinary English
sentences from the Python standard library's docstrings, so that calibration with up to 1024
sentences can be measured (``benchmarks/calibration_size.py``, issue 15).

    .venv/bin/python benchmarks/zoo/make_sentences.py [--extra 896] [--seed 15]

The 600 evaluation sentences and the 128 calibration sentences already in the file are kept as
they are; ``calibration_extra`` gets ``--extra`` new ones, none equal to any of those 728 (so the
pool stays disjoint from the evaluation set). Sources are read with ``ast`` (nothing is imported):
every module, class and function docstring of the stdlib's ``.py`` files (tests, ``idlelib``,
``lib2to3``, ``site-packages`` left out), in sorted path order; each docstring's paragraphs split
into sentences, kept when they look like the existing pool (6 to 39 words, 27 to 230 characters,
an upper-case start, one full stop at the end, only letters, digits, spaces and ``,'-():;``),
then a seeded shuffle picks ``--extra`` of them. The file records the Python version and the
count of candidates. Deterministic for a given Python version and seed.
"""
from __future__ import annotations

import argparse
import ast
import json
import random
import re
import sys
import sysconfig
from pathlib import Path
from typing import Iterator

HERE = Path(__file__).resolve().parent
SENTENCES = HERE / "sentences.json"
SKIP_DIRS = {"test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages", "__pycache__"}
ALLOWED = re.compile(r"^[A-Z][A-Za-z0-9 ,'\-():;]*\.$")


def docstrings(root: Path) -> Iterator[str]:
    """Every module, class and function docstring of the ``.py`` files under ``root`` (sorted paths)."""
    for path in sorted(root.rglob("*.py")):
        if SKIP_DIRS & set(path.relative_to(root).parts[:-1]):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc:
                    yield doc


def sentences_of(doc: str) -> Iterator[str]:
    """The sentences of a docstring's paragraphs that look like the benchmark's (see the module docstring)."""
    for para in re.split(r"\n\s*\n", doc):
        text = " ".join(para.split())
        for s in re.split(r"(?<=\.)\s+(?=[A-Z])", text):
            words = s.split()
            if 6 <= len(words) <= 39 and 27 <= len(s) <= 230 and ALLOWED.match(s) and s.count(".") == 1:
                yield s


def candidates(root: Path) -> list[str]:
    """Distinct sentences from the stdlib at ``root``, in first-seen order."""
    seen: dict[str, None] = {}
    for doc in docstrings(root):
        for s in sentences_of(doc):
            seen.setdefault(s, None)
    return list(seen)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--extra", type=int, default=896, help="new calibration sentences (128 + 896 = 1024)")
    ap.add_argument("--seed", type=int, default=15)
    args = ap.parse_args()
    data = json.loads(SENTENCES.read_text(encoding="utf-8"))
    taken = set(data["eval"]) | set(data["calibration"])
    pool = [s for s in candidates(Path(sysconfig.get_paths()["stdlib"])) if s not in taken]
    if len(pool) < args.extra:
        raise SystemExit(f"only {len(pool)} new sentences, {args.extra} asked")
    random.Random(args.seed).shuffle(pool)
    data["calibration_extra"] = pool[:args.extra]
    data["extra_source"] = (f"Python {sys.version.split()[0]} stdlib docstrings, {len(pool)} candidate sentences "
                            f"not in eval or calibration; {args.extra} drawn with benchmarks/zoo/make_sentences.py "
                            f"--seed {args.seed}")
    SENTENCES.write_text(json.dumps(data, indent=0), encoding="utf-8")  # the file's own layout
    print(data["extra_source"])


if __name__ == "__main__":
    main()
