"""Encode and decode one state_dict with NNCodec (the baseline), in NNCodec's own venv.

    /work/nnc-venv/bin/python benchmarks/nncodec_runner.py IN.pt --qp -33 \\
        --bitstream OUT.nnc --decoded OUT.pt
    /work/nnc-venv/bin/python benchmarks/nncodec_runner.py IN.pt --qp -34 -33 -32 \\
        --bitstream 'out-{qp}.nnc' --decoded 'out-{qp}.pt'

Prints one JSON line per qp: qp, bitstream bytes, parameters, bits/param, encode and decode
seconds. The decoded state_dict has the keys, shapes and dtypes of the input. With several qp
values, ``{qp}`` in the output paths is replaced by each (the input is loaded once).

NNCodec (`nncodec==2.1.3`) is called with its defaults except qp: dependent quantization on,
every tensor of 2+ dims coded at ``qp`` (step 2^(qp/4)), 1-D tensors at ``nonweight_qp`` = -75
(almost lossless). Set it up in its own venv (it needs numpy<2 and a C++ build)::

    python3 -m venv /work/nnc-venv
    /work/nnc-venv/bin/pip install torch==2.13.0
    /work/nnc-venv/bin/pip install "numpy<2" pybind11 scikit-learn tqdm h5py pandas click
    /work/nnc-venv/bin/pip install --no-deps --no-build-isolation nncodec==2.1.3

Its declared dependencies torchvision, opencv-python, ptflops and torchmetrics serve only its
training code (and no CPU torchvision wheel exists for torch 2.13): this script puts empty
stand-ins for them on ``sys.meta_path`` before importing it.
"""
from __future__ import annotations

import argparse
import importlib.abc
import importlib.machinery
import json
import os
import sys
import time
import types

STUBBED = ("torchvision", "cv2", "ptflops", "torchmetrics")


class _StubMeta(type):
    """Stand-in classes: any attribute is another stand-in class (so it can be called,
    subclassed, or used as a namespace)."""

    def __getattr__(cls, name: str):
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        child = _StubMeta(name, (), {"__init__": lambda self, *a, **k: None})
        setattr(cls, name, child)
        return child


class _Anything(types.ModuleType):
    """A stand-in module: every attribute is a stand-in class."""

    def __getattr__(self, name: str):
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        child = _StubMeta(name, (), {"__init__": lambda self, *a, **k: None})
        setattr(self, name, child)
        return child


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path, target=None):
        if fullname.split(".")[0] in STUBBED:
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        m = _Anything(spec.name)
        m.__path__ = []
        return m

    def exec_module(self, module):
        pass


def import_nnc():
    sys.meta_path.insert(0, _StubFinder())
    from nncodec import nnc  # noqa: PLC0415
    return nnc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("input", help="a .pt state_dict of plain tensors")
    ap.add_argument("--qp", type=int, nargs="+", required=True,
                    help="NNCodec quantization parameter(s) (step 2^(qp/4))")
    ap.add_argument("--bitstream", required=True, help="where the NNCodec bitstream goes ({qp} is replaced)")
    ap.add_argument("--decoded", required=True, help="where the decoded state_dict (.pt) goes ({qp} is replaced)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    import numpy as np
    import torch
    torch.set_num_threads(args.threads)
    nnc = import_nnc()

    sd = torch.load(args.input, map_location="cpu", weights_only=True)
    params = {}
    for k, v in sd.items():
        # NNCodec indexes shape[0] of every array: a 0-dim tensor (BatchNorm's num_batches_tracked)
        # goes in as shape (1,) and is reshaped back after decoding
        v = v.reshape(1) if v.dim() == 0 else v
        if v.is_floating_point():
            params[k] = v.detach().to(torch.float32).contiguous().numpy().copy()
        elif v.dtype in (torch.int32, torch.int64, torch.int16, torch.int8, torch.uint8, torch.bool):
            params[k] = v.detach().to(torch.int32).contiguous().numpy().copy()
        else:
            raise SystemExit(f"{k}: dtype {v.dtype} not supported by this runner")

    if len(args.qp) > 1 and ("{qp}" not in args.bitstream or "{qp}" not in args.decoded):
        raise SystemExit("with several --qp values, put {qp} in --bitstream and --decoded")
    n = sum(v.numel() for v in sd.values())
    for qp in args.qp:
        bitstream_path = args.bitstream.replace("{qp}", str(qp))
        decoded_path = args.decoded.replace("{qp}", str(qp))
        # NNCodec prints progress to stdout: keep stdout for our JSON lines
        real_stdout = sys.stdout
        sys.stdout = sys.stderr
        try:
            t0 = time.perf_counter()
            # a fresh copy each time: do not trust a codec to leave its input alone
            bitstream = nnc.compress({k: a.copy() for k, a in params.items()}, bitstream_path=bitstream_path,
                                     qp=qp, return_bitstream=True)
            enc_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            dec = nnc.decompress(bitstream_path)
            dec_s = time.perf_counter() - t0
        finally:
            sys.stdout = real_stdout
        out = {}
        for k, v in sd.items():
            arr = np.asarray(dec[k])
            if v.dim() == 0 and arr.size == 1:
                arr = arr.reshape(())
            if tuple(arr.shape) != tuple(v.shape):
                raise SystemExit(f"{k}: NNCodec decoded shape {arr.shape}, expected {tuple(v.shape)}")
            out[k] = torch.from_numpy(np.ascontiguousarray(arr)).to(v.dtype).reshape(v.shape)  # ascontiguousarray makes 0-dim 1-dim
        torch.save(out, decoded_path)
        size = os.path.getsize(bitstream_path)
        print(json.dumps({"codec": "nncodec", "version": "2.1.3", "qp": qp, "bytes": size,
                          "bitstream_len_returned": len(bitstream), "parameters": n,
                          "bits_per_param": 8 * size / n, "encode_s": round(enc_s, 3),
                          "decode_s": round(dec_s, 3), "bitstream": bitstream_path, "decoded": decoded_path}),
              flush=True)


if __name__ == "__main__":
    main()
