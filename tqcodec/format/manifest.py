"""The manifest: canonical MessagePack (spec §5.1) and its generic structure (spec §5.2-§5.5).

This module knows bytes and plain values, not numerics: it checks names, dtypes and
shapes, and leaves each mode's ``params`` to the mode (spec §7).
"""
from __future__ import annotations

import math

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import msgpack

from .. import limits as L
from ..errors import fail
from .dtypes import DTYPES
from .header import ZSTD_MANIFEST
from .zstdframe import compress_frame, decompress_frame



# --- spec §5.1 canonical MessagePack -------------------------------------------------

def _canonical(value: Any) -> Any:
    """``value`` with every map's keys sorted (bytewise UTF-8 order = code point order)."""
    if isinstance(value, dict):
        return {k: _canonical(value[k]) for k in sorted(value)}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    return value


def pack_canonical(value: Any) -> bytes:
    """Encode ``value`` as canonical MessagePack (spec §5.1)."""
    _check_packable(value, 1)
    return msgpack.packb(_canonical(value), use_bin_type=True, strict_types=False)


def _check_packable(value: Any, depth: int) -> None:
    if depth > L.MAX_MSGPACK_DEPTH:
        raise fail("BAD_OPTION", "metadata nested deeper than 16 levels")
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise fail("BAD_OPTION", f"metadata keys must be strings, got {type(k).__name__}")
            _check_packable(v, depth + 1)
    elif isinstance(value, (list, tuple)):
        for v in value:
            _check_packable(v, depth + 1)
    elif value is None or isinstance(value, (bool, int, float, str, bytes)):
        if isinstance(value, int) and not isinstance(value, bool) and not -(1 << 63) <= value < (1 << 64):
            raise fail("BAD_OPTION", "integer out of MessagePack range")
    else:
        raise fail("BAD_OPTION", f"value of type {type(value).__name__} cannot be stored in the manifest")


def _check_structure(value: Any, limit: int = L.MAX_MSGPACK_DEPTH) -> None:
    """Spec §5.1: nesting depth at most ``limit`` and every map key a string (msgpack also
    accepts binary keys). Iterative, stopping as soon as the depth passes ``limit``: msgpack
    accepts up to ~1000 levels, more than Python's recursion limit."""
    stack = [(value, 1)]
    while stack:
        v, d = stack.pop()
        if d > limit:
            raise fail("BAD_MANIFEST", f"manifest nested deeper than {limit} levels")
        if isinstance(v, dict):
            if not all(isinstance(k, str) for k in v):
                raise fail("BAD_MANIFEST", "manifest map with a key that is not a string")
            stack.extend((x, d + 1) for x in v.values())
        elif isinstance(v, list):
            stack.extend((x, d + 1) for x in v)


def unpack_canonical(data: bytes) -> Any:
    """Decode canonical MessagePack, rejecting anything §5.1 does not allow (BAD_MANIFEST)."""
    n = len(data)
    try:
        value = msgpack.unpackb(
            data, raw=False, use_list=True, strict_map_key=True, timestamp=0,
            max_str_len=n, max_bin_len=n, max_array_len=n, max_map_len=n, max_ext_len=0,
        )
    except Exception as exc:  # msgpack raises many types on bad input; all mean the same here
        raise fail("BAD_MANIFEST", f"manifest is not valid MessagePack ({type(exc).__name__}: {exc})") from None
    _check_structure(value)
    try:
        again = msgpack.packb(_canonical(value), use_bin_type=True)
    except Exception as exc:
        raise fail("BAD_MANIFEST", f"manifest holds a value that cannot be canonical ({exc})") from None
    if again != data:
        raise fail("BAD_MANIFEST", "manifest is not canonical MessagePack (key order, duplicate keys, "
                                   "non-shortest encodings, float32, or non-string keys)")
    return value


# --- spec §5.2-§5.5 -------------------------------------------------------------------

@dataclass(frozen=True)
class TensorRecord:
    """One Tensor_Record of the manifest (spec §5.3); ``params`` is the mode's raw map."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    mode: str
    params: Mapping[str, Any]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def itemsize(self) -> int:
        return DTYPES[self.dtype].itemsize

    def to_value(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape),
                "mode": self.mode, "params": dict(self.params)}


@dataclass(frozen=True)
class Manifest:
    """The decoded manifest (spec §5.2)."""

    metadata: Mapping[str, Any]
    tensors: tuple[TensorRecord, ...]

    def to_bytes(self) -> bytes:
        return pack_canonical({"metadata": dict(self.metadata),
                               "tensors": [t.to_value() for t in self.tensors]})


def check_name(name: Any) -> str:
    """Spec §5.4: a name that is safe to use anywhere, else BAD_TENSOR_RECORD."""
    if not isinstance(name, str):
        raise fail("BAD_TENSOR_RECORD", "tensor name is not a string")
    if not name:
        raise fail("BAD_TENSOR_RECORD", "tensor name is empty")
    if len(name.encode("utf-8", "surrogatepass")) > L.MAX_NAME_BYTES:
        raise fail("BAD_TENSOR_RECORD", f"tensor name longer than {L.MAX_NAME_BYTES} bytes: {name[:40]!r}...")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in name):
        raise fail("BAD_TENSOR_RECORD", f"tensor name has a control character: {name!r}")
    if "\\" in name or name.startswith("/") or any(seg in (".", "..") for seg in name.split("/")):
        raise fail("BAD_TENSOR_RECORD", f"tensor name looks like a path: {name!r}")
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise fail("BAD_TENSOR_RECORD", f"tensor name is not valid Unicode: {name!r}") from None
    return name


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def parse_record(value: Any, index: int) -> TensorRecord:
    """Spec §5.3: one Tensor_Record's generic fields (the mode checks ``params``)."""
    if not isinstance(value, dict):
        raise fail("BAD_TENSOR_RECORD", f"tensor record {index} is not a map")
    for key in ("name", "dtype", "shape", "mode", "params"):
        if key not in value:
            raise fail("BAD_TENSOR_RECORD", f"tensor record {index} has no {key!r}")
    name = check_name(value["name"])
    dtype = value["dtype"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise fail("BAD_TENSOR_RECORD", f"tensor {name!r}: unknown dtype {dtype!r}")
    shape = value["shape"]
    if not isinstance(shape, list) or not all(_is_int(d) for d in shape):
        raise fail("BAD_TENSOR_RECORD", f"tensor {name!r}: shape is not a list of integers")
    if any(d < 0 for d in shape):
        raise fail("BAD_TENSOR_RECORD", f"tensor {name!r}: negative dimension in shape {shape}")
    if len(shape) > L.MAX_NDIM:
        raise fail("LIMIT_EXCEEDED", f"tensor {name!r}: {len(shape)} dimensions (limit {L.MAX_NDIM})")
    if any(d > L.MAX_DIM for d in shape):
        raise fail("LIMIT_EXCEEDED", f"tensor {name!r}: dimension over 2^40 in shape {shape}")
    extent = 1  # spec §5.3: for the element limit a dimension of 0 counts as 1
    for d in shape:
        extent *= max(d, 1)
    if extent > L.MAX_NUMEL:
        raise fail("LIMIT_EXCEEDED", f"tensor {name!r}: shape {shape} is over the element limit 2^36 "
                                     "(0 dimensions counted as 1)")
    mode = value["mode"]
    if not isinstance(mode, str):
        raise fail("BAD_TENSOR_RECORD", f"tensor {name!r}: mode is not a string")
    params = value["params"]
    if not isinstance(params, dict):
        raise fail("BAD_TENSOR_RECORD", f"tensor {name!r}: params is not a map")
    return TensorRecord(name, dtype, tuple(shape), mode, params)


# --- spec §5.0 the stored manifest ---------------------------------------------------------

# Encoder choice (informative in §5.0): zstd level 19 up to 4 MiB of manifest, level 9 above
# (a manifest that carries a tokenizer can reach megabytes, and level 19 runs at a few MB/s).
_ZSTD_LEVELS = ((1 << 22, 19), (L.MAX_MANIFEST_LENGTH, 9))


def store_manifest(manifest: bytes) -> tuple[bytes, int]:
    """Spec §5.0: the manifest's bytes as the file holds them, and the required feature bits that
    says. One zstd frame (``ZSTD_MANIFEST``) where that is shorter, else the manifest itself."""
    level = next(lv for size, lv in _ZSTD_LEVELS if len(manifest) <= size)
    frame = compress_frame(manifest, level)
    if len(frame) < len(manifest):
        return frame, ZSTD_MANIFEST
    return manifest, 0


def unstore_manifest(stored: bytes, required_features: int,
                     max_manifest_length: int = L.MAX_MANIFEST_LENGTH) -> bytes:
    """Spec §5.0: the manifest from its stored bytes (after their CRC was checked). With
    ``ZSTD_MANIFEST`` the frame's checks come first, in §7.2's order, with ``BAD_MANIFEST`` for a
    bad frame and ``LIMIT_EXCEEDED`` for a content size over ``max_manifest_length``."""
    if not required_features & ZSTD_MANIFEST:
        return stored
    return decompress_frame(stored, what="compressed manifest", bad="BAD_MANIFEST",
                            max_size=max_manifest_length)


def parse_manifest(data: bytes) -> Manifest:
    """Spec §5: decode and check a manifest's bytes (mode parameters are checked later)."""
    value = unpack_canonical(data)
    if not isinstance(value, dict):
        raise fail("BAD_MANIFEST", "manifest is not a map")
    if "metadata" not in value or "tensors" not in value:
        raise fail("BAD_MANIFEST", "manifest lacks 'metadata' or 'tensors'")
    metadata, tensors = value["metadata"], value["tensors"]
    if not isinstance(metadata, dict):
        raise fail("BAD_MANIFEST", "manifest 'metadata' is not a map")
    if len(metadata) > L.MAX_METADATA_ENTRIES:
        raise fail("LIMIT_EXCEEDED", f"{len(metadata)} metadata entries (limit {L.MAX_METADATA_ENTRIES})")
    if not isinstance(tensors, list):
        raise fail("BAD_MANIFEST", "manifest 'tensors' is not an array")
    if len(tensors) > L.MAX_TENSORS:
        raise fail("LIMIT_EXCEEDED", f"{len(tensors)} tensors (limit {L.MAX_TENSORS})")
    records = []
    seen: set[str] = set()
    for i, raw in enumerate(tensors):
        rec = parse_record(raw, i)
        if rec.name in seen:
            raise fail("BAD_TENSOR_RECORD", f"tensor name {rec.name!r} appears twice")
        seen.add(rec.name)
        records.append(rec)
    return Manifest(metadata, tuple(records))


def check_record_value_types(params: Mapping[str, Any], spec: Sequence[tuple[str, type]], name: str) -> None:
    """Mode helper: ``params`` has exactly the keys of ``spec`` with those types."""
    keys = {k for k, _ in spec}
    if set(params) != keys:
        raise fail("BAD_TENSOR_RECORD", f"tensor {name!r}: params keys {sorted(params)} != {sorted(keys)}")
    for key, typ in spec:
        v = params[key]
        ok = _is_int(v) if typ is int else isinstance(v, typ)
        if not ok:
            raise fail("BAD_TENSOR_RECORD", f"tensor {name!r}: params[{key!r}] is not {typ.__name__}")
