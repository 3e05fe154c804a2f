"""Tensors in and out of the pipeline: torch dtypes and tensors <-> numpy storage arrays
(``tqcodec.format.dtypes``), the encoder's input rules, and tied tensors (stored once, as an
``alias``). One tensor at a time; no files."""
from __future__ import annotations

import os
from typing import Any, Iterable, Optional, Union

import numpy as np
import torch

from ..errors import TqzError, fail
from ..format.dtypes import STORAGE
from ..format.manifest import check_name

TORCH: dict[str, torch.dtype] = {
    "float64": torch.float64, "float32": torch.float32, "float16": torch.float16,
    "bfloat16": torch.bfloat16, "int64": torch.int64, "int32": torch.int32, "int16": torch.int16,
    "int8": torch.int8, "uint8": torch.uint8, "bool": torch.bool,
}
for _name, _attr in (("uint16", "uint16"), ("uint32", "uint32"), ("uint64", "uint64")):
    if hasattr(torch, _attr):
        TORCH[_name] = getattr(torch, _attr)
FROM_TORCH = {v: k for k, v in TORCH.items()}


def name_of_torch(dtype: torch.dtype) -> str:
    """The spec §5.5 name of a torch dtype, or BAD_INPUT for dtypes the format lacks."""
    try:
        return FROM_TORCH[dtype]
    except KeyError:
        raise fail("BAD_INPUT", f"dtype {dtype} cannot be stored (complex and float8 types are refused)") from None


def tensor_to_storage(t: torch.Tensor) -> tuple[str, np.ndarray]:
    """(dtype name, contiguous numpy storage array) of a CPU tensor; copies only when needed."""
    name = name_of_torch(t.dtype)
    t = t.detach().to("cpu").resolve_conj().resolve_neg().contiguous()  # lazy neg/conj views: real values
    if name == "bfloat16":
        arr = t.view(torch.int16).numpy().view(np.uint16)
    elif name in ("uint16", "uint32", "uint64"):
        signed = {"uint16": torch.int16, "uint32": torch.int32, "uint64": torch.int64}[name]
        arr = t.view(signed).numpy().view(STORAGE[name])
    else:
        arr = t.numpy()
    return name, arr.astype(STORAGE[name], copy=False)


def storage_to_tensor(name: str, arr: np.ndarray) -> torch.Tensor:
    """A torch tensor of dtype ``name`` sharing ``arr``'s bytes when it can."""
    shape = arr.shape
    arr = np.ascontiguousarray(arr, dtype=STORAGE[name]).reshape(shape)  # keeps 0-d arrays 0-d
    if not arr.flags.writeable:
        arr = arr.copy()
    if name == "bfloat16":
        return torch.from_numpy(arr.view(np.int16)).view(torch.bfloat16)
    if name in ("uint16", "uint32", "uint64"):
        signed = {"uint16": np.int16, "uint32": np.int32, "uint64": np.int64}[name]
        t = torch.from_numpy(arr.view(signed))
        return t.view(TORCH[name]) if name in TORCH else t
    return torch.from_numpy(arr)



def check_tensor(name: object, value: object, path: Optional[Union[str, os.PathLike]] = None) -> None:
    """Encoder input rules: ``name`` a valid tensor name (spec §5.4), ``value`` a plain, dense
    tensor with data, of a dtype the format has (spec §5.5). Else BAD_INPUT, naming why."""
    if not isinstance(name, str):
        raise fail("BAD_INPUT", f"tensor name {name!r} is not a string", path)
    try:
        check_name(name)
    except TqzError as exc:
        raise fail("BAD_INPUT", exc.message, path) from None
    if not isinstance(value, torch.Tensor):
        raise fail("BAD_INPUT", f"{name!r} is a {type(value).__name__}, not a tensor", path)
    if type(value) not in (torch.Tensor, torch.nn.Parameter):
        raise fail("BAD_INPUT", f"{name!r} is a {type(value).__name__}, a tensor subclass tqcodec does not "
                                "store (store value.as_subclass(torch.Tensor) for its plain values)", path)
    if value.is_complex():
        raise fail("BAD_INPUT", f"{name!r} has complex dtype {value.dtype}, which tqcodec refuses", path)
    if value.layout != torch.strided or value.is_quantized:
        raise fail("BAD_INPUT", f"{name!r} is a sparse or quantized tensor ({value.layout}, {value.dtype}); "
                                "store its dense values", path)
    if value.device.type == "meta":
        raise fail("BAD_INPUT", f"{name!r} is a meta tensor: it has no values to store", path)
    try:
        name_of_torch(value.dtype)
    except TqzError as exc:
        raise fail("BAD_INPUT", f"{name!r}: {exc.message}", path) from None


def is_lazy(value: Any) -> bool:
    """A tensor not loaded yet (e.g. ``tqcodec.io.hf.TensorRef``): it has ``load(rows=None)``
    and ``layout() -> (shape, is_float)``, and loads itself where it is encoded."""
    return not isinstance(value, torch.Tensor) and callable(getattr(value, "load", None))


def header_of(value: Any) -> tuple[str, tuple[int, ...]]:
    """(spec §5.5 dtype name, shape) of a tensor or of a lazy one (from its file's header)."""
    if is_lazy(value):
        return value.header()
    return name_of_torch(value.dtype), tuple(value.shape)


def loaded(name: str, value: Any, rows: Optional[tuple[int, int]] = None) -> torch.Tensor:
    """``value`` (a lazy one loaded: all of it, or its ``rows`` alone), checked by
    :func:`check_tensor` (a lazy tensor's file named)."""
    t = (value.load() if rows is None else value.load(rows)) if is_lazy(value) else value
    check_tensor(name, t, getattr(value, "path", None))
    return t


# --- tied tensors ---------------------------------------------------------------------------------

def tied_key(t: Any) -> Optional[tuple]:
    """What makes two in-memory tensors one (same storage, offset, shape, strides, dtype); None
    for anything else (an empty tensor, a lazy reference), which is never tied."""
    if not isinstance(t, torch.Tensor) or t.numel() == 0:
        return None
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)


def plan_entries(items: Iterable[tuple[str, Any]]) -> list[tuple[str, Any, Optional[int]]]:
    """``(name, value, alias target index or None)`` for each entry, in order: a tensor tied to an
    earlier one (:func:`tied_key`) becomes an alias of the first."""
    out: list[tuple[str, Any, Optional[int]]] = []
    first_of: dict[tuple, int] = {}
    for i, (name, v) in enumerate(items):
        key = tied_key(v)
        if key is not None and key in first_of:
            out.append((name, v, first_of[key]))
            continue
        if key is not None:
            first_of[key] = i
        out.append((name, v, None))
    return out
