"""Helpers shared by several test modules (fixtures that use them are in ``tests/conftest.py``)."""
from __future__ import annotations

import io
import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

import tqcodec
from tqcodec.format.chunks import CHUNK_HEADER_SIZE
from tqcodec.format.header import HEADER_SIZE
from tqcodec.format.index import FOOTER_SIZE
from tqcodec.format.manifest import TensorRecord
from tqcodec.format.steps import steps_from_codes
from tqcodec.format.writer import ContainerWriter
from tqcodec.io import hf
from tqcodec.modes import raw as raw_mode
from tqcodec.modes import tq as tq_mode
from tqcodec.modes import uniform as uniform_mode
from tqcodec.modes.rd import measured_bits, weighted_distortion
from tqcodec.pipeline.tensors import tensor_to_storage

# --- state dicts and models -----------------------------------------------------------------------

def small_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """A small state dict with every dtype family, buffers, an empty tensor and scalars."""
    g = torch.Generator().manual_seed(seed)
    conv = torch.randn(8, 4, 3, 3, generator=g) * 0.2
    fc = torch.randn(16, 72, generator=g) * 0.1
    return {
        "conv.weight": conv,
        "conv.bias": torch.randn(8, generator=g) * 0.01,
        "bn.running_mean": torch.randn(8, generator=g),
        "bn.running_var": torch.rand(8, generator=g) + 1e-6,
        "bn.num_batches_tracked": torch.tensor(1234),
        "fc.weight": fc,
        "fc.bias": torch.zeros(16),
        "emb.weight": (torch.randn(50, 12, generator=g) * 0.5).to(torch.bfloat16),
        "half.weight": (torch.randn(20, 20, generator=g)).to(torch.float16),
        "double.weight": torch.randn(30, 10, generator=g, dtype=torch.float64),
        "mask": torch.tensor([True, False, True]),
        "ids": torch.arange(-5, 5, dtype=torch.int32),
        "bytes": torch.arange(0, 250, 7, dtype=torch.uint8),
        "empty": torch.zeros(0, 3),
        "scalar": torch.tensor(2.5),
        "one": torch.tensor([7.0]),
    }


def layered_model(n: int = 8, rows: int = 64, cols: int = 96, seed: int = 0) -> dict[str, torch.Tensor]:
    """``n`` layers and a tied head (an alias): the model streamed through pipes and stdin."""
    g = torch.Generator().manual_seed(seed)
    sd = {f"layer{i}.weight": torch.randn(rows, cols, generator=g) * 0.05 for i in range(n)}
    sd["layer0.bias"] = torch.zeros(rows)
    sd["head.weight"] = sd["layer0.weight"]  # tied: an alias, complete when the position passes it
    return sd


def remote_model(n: int = 12, seed: int = 0) -> dict[str, torch.Tensor]:
    """``n`` blocks, int64 ids and a tied head (an alias): the model served over HTTP."""
    g = torch.Generator().manual_seed(seed)
    sd = {f"block{i}.weight": torch.randn(128, 160, generator=g) * 0.05 for i in range(n)}
    sd["block0.bias"] = torch.randn(128, generator=g)
    sd["ids"] = torch.arange(40, dtype=torch.int64)
    sd["head.weight"] = sd["block0.weight"]  # an alias
    return sd


def toy_model(seed: int = 0) -> dict[str, torch.Tensor]:
    """A toy transformer in bfloat16 (with an int64 and a float32 tensor): the Hugging Face folders' model."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for i in range(3):
        sd[f"layers.{i}.attn.weight"] = (torch.randn(48, 48, generator=g) * 0.05).to(torch.bfloat16)
        sd[f"layers.{i}.mlp.weight"] = (torch.randn(96, 48, generator=g) * 0.05).to(torch.bfloat16)
        sd[f"layers.{i}.norm.weight"] = torch.ones(48, dtype=torch.bfloat16)
    sd["embed.weight"] = torch.randn(100, 48, generator=g).to(torch.bfloat16)
    sd["pos_ids"] = torch.arange(64, dtype=torch.int64)
    sd["head.bias"] = torch.randn(100, generator=g)  # float32 among bf16: alignment in shards
    return sd


class Small(nn.Module):
    """Convs (plain, grouped, depthwise), a BatchNorm and two linear layers: mode tq's test model."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1, groups=4)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.bn = nn.BatchNorm2d(8)
        self.fc1 = nn.Linear(8 * 6 * 6, 48)
        self.fc2 = nn.Linear(48, 5)

    def forward(self, x):
        x = torch.relu(self.c1(x))
        x = torch.relu(self.c2(x))
        x = self.bn(self.dw(x))
        x = torch.relu(self.fc1(x.flatten(1)))
        return self.fc2(x)


def param_count(sd) -> int:
    return sum(t.numel() for t in sd.values())


# --- comparing tensors, expecting errors ----------------------------------------------------------

def bit_view(t: torch.Tensor) -> torch.Tensor:
    """A view that compares bit for bit (NaN-safe)."""
    if t.dtype.is_floating_point:
        width = {8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()]
        return t.contiguous().view(width)
    return t


def tensor_bytes(t: torch.Tensor) -> bytes:
    """The bytes of a tensor's values (contiguous, little-endian storage)."""
    flat = t.contiguous().reshape(-1)
    return bytes(flat.view(torch.uint8).numpy()) if flat.numel() else b""


def code_of(fn) -> str:
    """The code of the TqzError ``fn()`` raises (fails if it raises none)."""
    with pytest.raises(tqcodec.TqzError) as e:
        fn()
    return e.value.code


# --- the bytes of a .tqz file ---------------------------------------------------------------------

def regions(data: bytes) -> dict[str, list[int]]:
    """Byte offsets of each region of a file, found from its own structures."""
    mlen = struct.unpack_from("<I", data, 20)[0]
    index_offset = struct.unpack_from("<Q", data, len(data) - FOOTER_SIZE)[0]
    chunk_headers, payloads = [], []
    pos = HEADER_SIZE + mlen
    while pos < index_offset:
        plen = struct.unpack_from("<I", data, pos + 20)[0]
        chunk_headers.append(pos)
        payloads.append(pos + CHUNK_HEADER_SIZE)
        pos += CHUNK_HEADER_SIZE + plen
    return {"header": [HEADER_SIZE], "manifest": [HEADER_SIZE + mlen], "chunk_headers": chunk_headers,
            "payloads": payloads, "index": [index_offset], "footer": [len(data) - FOOTER_SIZE],
            "mlen": [mlen], "index_offset": [index_offset]}


def fix_header_crc(b: bytearray) -> None:
    struct.pack_into("<I", b, 28, zlib.crc32(bytes(b[:28])))


def decode_both(data: bytes) -> set[str]:
    """Codes given by front-to-back load and by random access (empty set = decoded)."""
    codes = set()
    for how in ("load", "open"):
        try:
            if how == "load":
                tqcodec.load(data)
            else:
                with tqcodec.open(data) as f:
                    for k in f.keys():
                        f.get_tensor(k)
        except tqcodec.TqzError as exc:
            codes.add(exc.code)
    return codes


# --- files ----------------------------------------------------------------------------------------

def listing(d: Path) -> list[str]:
    """The sorted names in folder ``d``."""
    return sorted(p.name for p in d.iterdir())


class FailingFile:
    """Wraps the temporary output file: after ``limit`` bytes a write fails like a full disk."""

    def __init__(self, f, limit: int, exc: BaseException):
        self._f, self._left, self._exc = f, limit, exc

    def write(self, b) -> int:
        b = bytes(b)
        if len(b) > self._left:
            self._f.write(b[:self._left])  # a real disk takes what fits, then fails
            self._left = 0
            raise self._exc
        self._left -= len(b)
        return self._f.write(b)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


def fail_writes_after(monkeypatch, limit: int, exc: BaseException) -> None:
    """Make every file opened with ``os.fdopen`` (atomic outputs) fail like a full disk after ``limit`` bytes."""
    real_fdopen = os.fdopen
    monkeypatch.setattr(os, "fdopen", lambda fd, *a, **k: FailingFile(real_fdopen(fd, *a, **k), limit, exc))


# --- hostile inputs -------------------------------------------------------------------------------

MARKER_ENV = "TQZ_HOSTILE_MARKER"  # the marker file a pickle's code would create (conftest: ``marker``)


class RunsCode:
    """Unpickling this creates the marker file (if it is ever unpickled)."""

    def __reduce__(self):
        return (os.system, (f"touch {os.environ[MARKER_ENV]}",))


class RunsEval:
    """Unpickling this creates the marker file through eval (if it is ever unpickled)."""

    def __reduce__(self):
        return (eval, (f"open({os.environ[MARKER_ENV]!r}, 'w').close()",))


class MyTensor(torch.Tensor):
    """A tensor subclass (which tqcodec refuses to store)."""


# --- Hugging Face folders -------------------------------------------------------------------------

HF_FILES = {"config.json": b'{"model_type": "toy", "hidden_size": 48}\n',
            "tokenizer.json": json.dumps({"vocab": {"a": 0, "\u00e9": 1}}).encode(),
            "generation_config.json": b"{}", "vocab.txt": b"[PAD]\n[UNK]\nhello\n",
            "tokenizer.model": bytes(range(256))}

def write_hf(folder: Path, sd: dict[str, torch.Tensor], shards: int) -> None:
    """A Hugging Face folder of ``sd`` in ``shards`` safetensors files, with HF_FILES, a weight-like
    file and a hidden file (neither carried)."""
    folder.mkdir(parents=True)
    names = list(sd)
    groups = [names[i::shards] for i in range(shards)]
    weight_map = {}
    for i, group in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors" if shards > 1 else "model.safetensors"
        save_file({k: sd[k] for k in group}, str(folder / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in group})
    if shards > 1:
        (folder / hf.INDEX_NAME).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    for name, data in HF_FILES.items():
        (folder / name).write_bytes(data)
    (folder / "big.bin").write_bytes(b"\0" * 10)  # a weight-like file: never carried
    (folder / ".hidden.json").write_bytes(b"{}")


def load_folder(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a folder's safetensors files."""
    out = {}
    for p in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(p)))
    return out


# --- modes ----------------------------------------------------------------------------------------

CLASSIC_MODES = ("ecsq", "kmeans", "pq", "dither")  # spec/mode-lineage.md §7.6-§7.9


def uniform_point(w: np.ndarray, h: np.ndarray, code: int) -> tuple[float, float]:
    """(measured bits, weighted distortion) of plain uniform quantization with step code ``code``:
    the point the classic modes' encoders are compared with."""
    _, params, streams = uniform_mode.encode(w, "float32", "tensor", codes=np.array([code]))
    step = float(steps_from_codes([code])[0])
    return measured_bits(params, streams), weighted_distortion(np.rint(w / step) * step, w, h)


# --- .tqz files with tq tensors written by the mode's own encoder (tests of tqcodec.model.nn) ---

def tq_tensor(w: torch.Tensor, layout: str, k, codes: list):
    """Params and streams of a tq tensor approximating ``w`` with ``len(codes)`` row bands: R per
    ``layout``; with ``k`` a float16 synthesis transform S [m, k] from R's top right singular
    vectors."""
    w64 = w.detach().double().numpy()
    r = w64.T if layout == "in_out" else w64.reshape(w64.shape[0], -1)
    s = None
    if k is None:
        c = r
    else:
        _, _, vt = np.linalg.svd(r, full_matrices=False)
        s = vt[:k].T.astype(np.float16)  # [m, k]
        c = s.astype(np.float64).T @ r.T  # [k, n]
    bounds = np.linspace(0, c.shape[0], len(codes) + 1).astype(int)
    steps = steps_from_codes(np.array(codes))
    levels = [np.round(c[a:b] / st).astype(np.int64) for a, b, st in zip(bounds[:-1], bounds[1:], steps)]
    return tq_mode.write(levels, codes, layout=layout, transform=s)[1:]


def tq_file(sd: dict, plan: dict) -> bytes:
    """A .tqz of ``sd``: tensors in ``plan`` as tq (``name -> (layout, k, codes)``), the rest raw."""
    buf = io.BytesIO()
    w = ContainerWriter(buf)
    for name, t in sd.items():
        dtype, arr = tensor_to_storage(t)
        if name in plan:
            params, streams = tq_tensor(t, *plan[name])
            mode = "tq"
        else:
            _, params, streams = raw_mode.write(arr, "none")
            mode = "raw"
        w.add_tensor(TensorRecord(name, dtype, tuple(t.shape), mode, params), streams)
    w.finish({})
    return buf.getvalue()
