"""Files a user hands to tqcodec or gets from it: atomic outputs and model files.

Model files are read safely: ``.pt``/``.pth`` only through ``torch.load(weights_only=True)``
(never a fallback to full unpickling), ``.safetensors`` through safetensors. Outputs are
written to a temporary file in the target directory, fsynced and renamed, so a failure
leaves any previous file intact and no partial file behind.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Iterator, Mapping, Union

import torch

from .errors import TqzError, fail

PathLike = Union[str, os.PathLike]
STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "module", "weights")


@contextlib.contextmanager
def atomic_output(path: PathLike, overwrite: bool = True) -> Iterator[BinaryIO]:
    """Yield a binary file that becomes ``path`` only if the block completes."""
    path = Path(path)
    if not overwrite and path.exists():
        raise fail("OUTPUT_EXISTS", "output exists (use --force to overwrite)", path)
    directory = path.parent if str(path.parent) else Path(".")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=directory)
    except OSError as exc:
        raise fail("IO_ERROR", f"cannot create a file in {directory}: {exc.strerror or exc}", path) from None
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise fail("IO_ERROR", f"cannot write: {exc.strerror or exc}", path) from None
        raise


def same_file(a: PathLike, b: PathLike) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _plain_tensors(obj: object, path: PathLike) -> dict[str, torch.Tensor]:
    """A flat name -> tensor dict from what torch.load returned (spec-free, encoder input rules)."""
    if isinstance(obj, Mapping):
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return _checked(obj, path)
        for key in STATE_DICT_KEYS:
            inner = obj.get(key) if all(isinstance(k, str) for k in obj) else None
            if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                return _checked(inner, path)
        bad = next(((k, v) for k, v in obj.items() if not isinstance(v, torch.Tensor)), None)
        if bad is not None:
            raise fail("BAD_INPUT", f"not a state_dict of plain tensors: {bad[0]!r} holds a "
                                    f"{type(bad[1]).__name__} (and no 'state_dict' or 'model' key holds one)", path)
        raise fail("BAD_INPUT", "the file holds an empty state_dict", path)
    raise fail("BAD_INPUT", f"not a state_dict: the file holds a {type(obj).__name__}", path)


def _checked(sd: Mapping, path: PathLike) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        if not isinstance(k, str):
            raise fail("BAD_INPUT", f"tensor name {k!r} is not a string", path)
        if type(v) not in (torch.Tensor, torch.nn.Parameter):
            raise fail("BAD_INPUT", f"{k!r} is a {type(v).__name__}, a tensor subclass tqcodec does not store", path)
        if v.is_complex():
            raise fail("BAD_INPUT", f"{k!r} has complex dtype {v.dtype}, which tqcodec refuses", path)
        if v.layout != torch.strided:
            raise fail("BAD_INPUT", f"{k!r} is a sparse or quantized tensor ({v.layout})", path)
        out[k] = v.detach()
    return out


def read_model(path: PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a ``.pt``/``.pth``/``.bin`` (weights_only) or ``.safetensors`` file."""
    path = Path(path)
    if not path.is_file():
        raise fail("IO_ERROR", "no such file" if not path.exists() else "not a regular file", path)
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
            return _checked(load_file(str(path)), path)
        except TqzError:
            raise
        except Exception as exc:
            raise fail("BAD_INPUT", f"not a readable safetensors file ({exc})", path) from None
    if suffix in (".pt", ".pth", ".bin", ".ckpt"):
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise fail("BAD_INPUT", "not a plain-tensor checkpoint; refusing to unpickle it "
                                    f"(weights_only=True said: {first[:200]})", path) from None
        return _plain_tensors(obj, path)
    raise fail("BAD_INPUT", f"unknown input type {suffix or '(no suffix)'}: expected .pt, .pth, .bin or "
                            ".safetensors", path)


def write_model(tensors: Mapping[str, torch.Tensor], path: PathLike, overwrite: bool,
                metadata: Mapping[str, str] | None = None) -> None:
    """Write ``tensors`` as ``.safetensors`` or ``.pt`` by the suffix of ``path``, atomically."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors.torch import save
        seen: set[int] = set()
        plain = {}
        for k, v in tensors.items():  # safetensors refuses shared storage: copy tied tensors
            ptr = v.untyped_storage().data_ptr() if v.numel() else -1
            plain[k] = v.clone() if ptr in seen else v.contiguous()
            if ptr != -1:
                seen.add(ptr)
        data = save(plain, metadata=dict(metadata) if metadata else None)
        with atomic_output(path, overwrite) as f:
            f.write(data)
    elif suffix in (".pt", ".pth", ".bin"):
        with atomic_output(path, overwrite) as f:
            torch.save(dict(tensors), f)
    else:
        raise fail("BAD_OPTION", f"cannot write {suffix or '(no suffix)'}: use .pt or .safetensors", path)
