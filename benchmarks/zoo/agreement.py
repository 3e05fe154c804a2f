"""Evaluate candidate .pt files with this repo's zoo evals (one JSON line each).

    python benchmarks/zoo/agreement.py digits REF.pt CAND.pt [CAND.pt ...]
    python benchmarks/zoo/agreement.py minilm REF.pt CAND.pt [CAND.pt ...]

Used to check that benchmarks/zoo agrees with the project's reference evals (AGREEMENT.md).
"""
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import torch  # noqa: E402

from benchmarks.zoo import digits, minilm  # noqa: E402


def main() -> None:
    model, ref_path, *cands = sys.argv[1:]
    zoo = {"digits": digits, "minilm": minilm}[model]
    torch.set_num_threads(2)
    ref = torch.load(ref_path, map_location="cpu", weights_only=True)
    for c in cands:
        t0 = time.time()
        r = zoo.evaluate(torch.load(c, map_location="cpu", weights_only=True), ref)
        r = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in r.items()}
        print(json.dumps({"candidate": c, **r, "seconds": round(time.time() - t0, 2)}))


if __name__ == "__main__":
    main()
