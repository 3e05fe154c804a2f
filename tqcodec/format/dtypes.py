"""Spec §5.5: the data types a tensor may have, their storage, and exact rounding to them.

Tensors travel between modules as numpy arrays in their *storage* dtype: the little-endian numpy
dtype with the same bytes (bfloat16 is stored as uint16 bits, since numpy has no bfloat16).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class DType:
    """One dtype of spec §5.5: its name, numpy storage dtype and safetensors code."""

    name: str
    storage: np.dtype
    safetensors: str

    @property
    def itemsize(self) -> int:
        return self.storage.itemsize

    @property
    def is_float(self) -> bool:
        return self.name in FLOAT_NAMES


FLOAT_NAMES = ("float64", "float32", "float16", "bfloat16")
DTYPES: dict[str, DType] = {d.name: d for d in (
    DType("float64", np.dtype("<f8"), "F64"), DType("float32", np.dtype("<f4"), "F32"),
    DType("float16", np.dtype("<f2"), "F16"), DType("bfloat16", np.dtype("<u2"), "BF16"),
    DType("int64", np.dtype("<i8"), "I64"), DType("int32", np.dtype("<i4"), "I32"),
    DType("int16", np.dtype("<i2"), "I16"), DType("int8", np.dtype("i1"), "I8"),
    DType("uint64", np.dtype("<u8"), "U64"), DType("uint32", np.dtype("<u4"), "U32"),
    DType("uint16", np.dtype("<u2"), "U16"), DType("uint8", np.dtype("u1"), "U8"),
    DType("bool", np.dtype("?"), "BOOL"),
)}
STORAGE: dict[str, np.dtype] = {n: d.storage for n, d in DTYPES.items()}


def storage_bytes(name: str, shape: tuple[int, ...]) -> int:
    """Bytes of a tensor's storage array (dtype ``name``, ``shape``)."""
    return math.prod(shape) * DTYPES[name].itemsize


def _bfloat16_values(bits: np.ndarray, dtype: type, block: int = 1 << 20) -> np.ndarray:
    """The values of bfloat16 storage ``bits`` as ``dtype`` (float32 or float64), widened in
    blocks: no uint32 or float32 copy of the whole tensor beside the result."""
    out = np.empty(bits.shape, dtype=dtype)
    flat, dest = bits.reshape(-1), out.reshape(-1)
    for s in range(0, flat.size, block):
        dest[s:s + block] = (flat[s:s + block].astype(np.uint32) << 16).view(np.float32)
    return out


def storage_to_float64(name: str, arr: np.ndarray) -> np.ndarray:
    """Exact float64 values of a float tensor's storage."""
    return _bfloat16_values(arr, np.float64) if name == "bfloat16" else arr.astype(np.float64)


EXACT_IN_FLOAT32 = ("float32", "float16", "bfloat16")


def storage_to_float32(name: str, arr: np.ndarray) -> np.ndarray:
    """Exact float32 values of a float32, float16 or bfloat16 tensor's storage (half the memory
    of :func:`storage_to_float64`, the same values once widened)."""
    if name not in EXACT_IN_FLOAT32:
        raise ValueError(f"float32 does not hold every {name} value exactly")
    return _bfloat16_values(arr, np.float32) if name == "bfloat16" else arr.astype(np.float32, copy=False)


def all_finite(name: str, arr: np.ndarray, block: int = 1 << 22) -> bool:
    """Whether a float tensor's storage holds no NaN or infinity (checked in blocks: no float64
    copy of the whole tensor)."""
    flat = arr.reshape(-1)
    return all(np.isfinite(storage_to_float64(name, flat[s:s + block])).all() for s in range(0, flat.size, block))


def peak_abs(name: str, arr: np.ndarray, block: int = 1 << 22) -> float:
    """The largest magnitude in a float tensor's storage (NaN if it holds one), in blocks."""
    flat = arr.reshape(-1)
    peak = 0.0
    for s in range(0, flat.size, block):
        v = np.abs(storage_to_float64(name, flat[s:s + block]))
        if np.isnan(v).any():
            return float("nan")
        peak = max(peak, float(v.max()))
    return peak


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


def round_binary32(name: str, values: np.ndarray) -> np.ndarray:
    """Spec §7.3.2 / §7.S.5: binary32 ``values`` rounded to dtype ``name`` (nearest, ties to
    even), as its storage array."""
    if name == "float32":
        return np.asarray(values).astype(np.float32, copy=False)
    if name == "float64":
        return np.asarray(values, dtype=np.float32).astype(np.float64)
    if name == "float16":
        with np.errstate(over="ignore"):  # overflow to +-inf is the spec's rounding, not a fault
            return np.asarray(values, dtype=np.float32).astype(np.float16)
    if name == "bfloat16":
        return float32_to_bfloat16_bits(values)
    raise ValueError(f"not a float dtype: {name}")


def round_binary64(name: str, values: np.ndarray) -> np.ndarray:
    """Spec §7.S.5, binary64 values: float64 kept; else to binary32 (nearest even), then as
    :func:`round_binary32`."""
    r = np.asarray(values, dtype=np.float64)
    if name == "float64":
        return r
    with np.errstate(over="ignore"):
        return round_binary32(name, r.astype(np.float32))
