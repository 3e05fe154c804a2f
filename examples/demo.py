"""tqcodec demo: compress a small real model with the `tqz` command line and check it still works.

    python examples/demo.py        (or: make demo)

1. Trains a small CNN on scikit-learn's bundled handwritten digits (about 10 s on one core,
   deterministic; reused from .demo/digits.pt when that file exists) and saves it as a plain
   PyTorch state_dict.
2. Measures calibration statistics (`tqcodec.calibrate`: each layer's input second moments on
   training images, which the test images never join) and saves them as .demo/stats.safetensors.
3. Runs `tqz encode` / `tqz decode` exactly as a user would, four times: lossless, the default
   (lossy, data-free) settings, a smaller data-free setting, and transform quantization with the
   statistics at a whole-file budget of 2 bits per weight.
4. Prints original and compressed sizes, bits per weight, and test accuracy before and after.

Everything is written under .demo/ (re-running overwrites it).
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.zoo import digits  # noqa: E402

WORK = ROOT / ".demo"

# (label, extra `tqz encode` options). The smaller lossy setting was chosen by measurement on
# this model: per-tensor steps at 30 dB weight SQNR keep top-1 at 0.992 (0.990 at 32 dB, 0.988 at
# 24 dB: 500 test images, so one image is 0.2 points).
RUNS = [
    ("lossless", ["--lossless"]),
    ("default (lossy)", []),
    ("lossy, smaller", ["--snr", "30", "--granularity", "tensor"]),
    ("tq, calibrated", ["--stats", ".demo/stats.safetensors", "--bits", "2"]),
]


def tqz(*args: str) -> str:
    """Run the real command line, as `python -m tqcodec ...`; echo it and its output."""
    cmd = [sys.executable, "-m", "tqcodec", *args]
    print("$ tqz " + " ".join(args))
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    out = (res.stdout + res.stderr).strip()
    if out:
        print("  " + out.replace("\n", "\n  "))
    if res.returncode != 0:
        raise SystemExit(f"demo: `tqz {' '.join(args)}` failed with exit status {res.returncode}")
    return res.stdout


def main() -> None:
    t0 = time.time()
    WORK.mkdir(exist_ok=True)
    model = WORK / "digits.pt"
    if model.exists():
        print(f"reusing {model.relative_to(ROOT)} (delete it to train again)")
    else:
        print("training the digits CNN (scikit-learn load_digits, 60 epochs) ...")
    sd = digits.reference_state_dict(model)
    params = sum(v.numel() for v in sd.values())
    acc0 = digits.top1(sd)
    print(f"{model.relative_to(ROOT)}: {len(sd)} tensors, {params} parameters, "
          f"test accuracy {acc0:.3f} on {digits.N_TEST} images\n")

    import tqcodec
    module = digits.build_module()
    module.load_state_dict(sd)
    module.eval()
    images = digits.calibration_inputs(1024)
    stats = tqcodec.calibrate(module, [images[i:i + 64] for i in range(0, len(images), 64)])
    stats.save(WORK / "stats.safetensors")
    print(f"calibration statistics from {len(images)} training images -> .demo/stats.safetensors\n")

    rows = []
    for i, (label, opts) in enumerate(RUNS):
        packed = WORK / f"digits-{i}.tqz"
        back = WORK / f"digits-{i}-decoded.pt"
        tqz("encode", str(model.relative_to(ROOT)), "-o", str(packed.relative_to(ROOT)), "--force", *opts)
        tqz("decode", str(packed.relative_to(ROOT)), "-o", str(back.relative_to(ROOT)), "--force")
        decoded = torch.load(back, map_location="cpu", weights_only=True)
        exact = all(torch.equal(decoded[k], sd[k]) for k in sd)
        rows.append((label, " ".join(opts) or "(none)", packed.stat().st_size, digits.top1(decoded), exact))
        print()

    size0 = model.stat().st_size
    print(f"original: {model.relative_to(ROOT)}, {size0} bytes ({8 * size0 / params:.2f} bits per weight "
          f"as a .pt file; fp32 is 32), test accuracy {acc0:.3f}\n")
    head = f"{'encode':<17}{'options':<48}{'.tqz bytes':>11}{'bits/weight':>13}{'smaller':>9}{'accuracy':>10}  exact"
    print(head)
    print("-" * len(head))
    for label, opts, size, acc, exact in rows:
        print(f"{label:<17}{opts:<48}{size:>11}{8 * size / params:>13.2f}{size0 / size:>8.1f}x"
              f"{acc:>10.3f}  {'yes' if exact else 'no'}")
    print(f"\naccuracy before decode: {acc0:.3f}; done in {time.time() - t0:.0f} s; files in .demo/")


if __name__ == "__main__":
    main()
