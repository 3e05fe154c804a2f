"""Data types of spec §5.5: names, numpy storage, torch dtypes, and exact rounding.

Tensors travel between modules as numpy arrays in their *storage* dtype: the
little-endian numpy dtype with the same bytes (bfloat16 is stored as uint16 bits,
since numpy has no bfloat16).
"""
from __future__ import annotations

import numpy as np
import torch

from .errors import fail

STORAGE: dict[str, np.dtype] = {
    "float64": np.dtype("<f8"), "float32": np.dtype("<f4"), "float16": np.dtype("<f2"),
    "bfloat16": np.dtype("<u2"),
    "int64": np.dtype("<i8"), "int32": np.dtype("<i4"), "int16": np.dtype("<i2"), "int8": np.dtype("i1"),
    "uint64": np.dtype("<u8"), "uint32": np.dtype("<u4"), "uint16": np.dtype("<u2"), "uint8": np.dtype("u1"),
    "bool": np.dtype("?"),
}

TORCH: dict[str, torch.dtype] = {
    "float64": torch.float64, "float32": torch.float32, "float16": torch.float16,
    "bfloat16": torch.bfloat16, "int64": torch.int64, "int32": torch.int32, "int16": torch.int16,
    "int8": torch.int8, "uint8": torch.uint8, "bool": torch.bool,
}
for _name, _attr in (("uint16", "uint16"), ("uint32", "uint32"), ("uint64", "uint64")):
    if hasattr(torch, _attr):
        TORCH[_name] = getattr(torch, _attr)
FROM_TORCH = {v: k for k, v in TORCH.items()}

FLOAT_NAMES = ("float64", "float32", "float16", "bfloat16")


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


def storage_to_float64(name: str, arr: np.ndarray) -> np.ndarray:
    """Exact float64 values of a float tensor's storage."""
    if name == "bfloat16":
        return (arr.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    return arr.astype(np.float64)


def all_finite(name: str, arr: np.ndarray, block: int = 1 << 22) -> bool:
    """Whether a float tensor's storage holds no NaN or infinity (checked in blocks: no float64
    copy of the whole tensor)."""
    flat = arr.reshape(-1)
    return all(np.isfinite(storage_to_float64(name, flat[s:s + block])).all() for s in range(0, flat.size, block))


def float32_to_bfloat16_bits(x: np.ndarray) -> np.ndarray:
    """Round float32 to bfloat16 (nearest, ties to even) and return the uint16 bits."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    # in place on one temporary (the decoder's peak memory): (bits + 0x7FFF + lsb) >> 16, mod 2^32
    rounded = bits >> np.uint32(16)
    rounded &= np.uint32(1)
    rounded += np.uint32(0x7FFF)
    rounded += bits
    rounded >>= np.uint32(16)
    return rounded.astype(np.uint16)


def round_exact_float32(name: str, values: np.ndarray) -> np.ndarray:
    """Spec §7.3.2: round values that are exact in float32 to dtype ``name`` (nearest-even)."""
    if name == "float32":
        return values.astype(np.float32, copy=False)
    if name == "float64":
        return values.astype(np.float64)
    if name == "float16":
        with np.errstate(over="ignore"):  # overflow to +-inf is the spec's rounding, not a fault
            return values.astype(np.float16)
    if name == "bfloat16":
        return float32_to_bfloat16_bits(values)
    raise ValueError(f"not a float dtype: {name}")
