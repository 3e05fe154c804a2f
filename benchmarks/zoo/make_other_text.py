"""Sentences unlike MiniLM's calibration and evaluation text (Python docstrings), to check that a
file transparent on the benchmark's evaluation stays sound on other text (``benchmarks/other_text.py``).

    .venv/bin/python benchmarks/zoo/make_other_text.py

Two sets, read from the installed packages' ``*.dist-info`` folders of this venv (nothing is
imported): ``packages``, sentences of the package descriptions (``METADATA`` bodies), and
``licences``, sentences of the licence files. Paragraphs are split into sentences and kept when
they look like the MiniLM pool (6 to 39 words, 27 to 230 characters, an upper-case start, one full
stop at the end, only letters, digits, spaces and ``,'-():;``); each set is de-duplicated, sorted,
shuffled with seed 0 and cut to 400. Writes ``other_text.json`` beside this file with the package
list it came from. The result depends on the installed packages, so the file is kept in the
repository and this script says how it was made.
"""
from __future__ import annotations

import json
import random
import re
import sysconfig
from pathlib import Path

HERE = Path(__file__).resolve().parent
ALLOWED = re.compile(r"^[A-Z][A-Za-z0-9 ,'\-():;]*\.$")


def sentences(texts: list[str]) -> list[str]:
    found = set()
    for text in texts:
        for para in text.split("\n\n"):
            para = " ".join(para.split())
            for s in re.split(r"(?<=\.)\s+", para):
                if ALLOWED.match(s) and 6 <= len(s.split()) <= 39 and 27 <= len(s) <= 230:
                    found.add(s)
    out = sorted(found)
    random.Random(0).shuffle(out)
    return out[:400]


def main() -> None:
    site = Path(sysconfig.get_paths()["purelib"])
    infos = sorted(site.glob("*.dist-info"))
    descriptions, licences = [], []
    for info in infos:
        meta = info / "METADATA"
        if meta.is_file():
            text = meta.read_text(errors="ignore")
            descriptions.append(text.split("\n\n", 1)[1] if "\n\n" in text else "")
        for lic in sorted(list(info.glob("LICENSE*")) + list(info.glob("licenses/*"))):
            if lic.is_file():
                licences.append(lic.read_text(errors="ignore"))
    out = {"packages": sentences(descriptions), "licences": sentences(licences),
           "source": [i.name for i in infos]}
    (HERE / "other_text.json").write_text(json.dumps(out, indent=0) + "\n")
    print({k: len(v) for k, v in out.items()})


if __name__ == "__main__":
    main()
