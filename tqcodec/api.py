"""The Python API: save, load, open, iter_tensors, verify.

This module joins the container (``format``), the coding modes (``modes``) and torch.
"""
from __future__ import annotations

import builtins
import contextlib
import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator, Mapping, Optional, Sequence, Union

import numpy as np
import torch

from . import __version__ as _version
from . import modes
from .dtypes import FLOAT_NAMES, name_of_torch, storage_to_float64, storage_to_tensor, tensor_to_storage
from .errors import TqzError, fail
from .fileio import atomic_output
from .format.container import (ContainerWriter, RandomAccessReader, TensorChunks, file_reader,
                               iter_chunks_front_to_back)
from .format.manifest import TensorRecord, check_name, pack_canonical
from .limits import DEFAULT_LIMITS, Limits
from .modes import alias, raw, uniform

PathLike = Union[str, os.PathLike]
Progress = Optional[Callable[[str, int, int], None]]
"""progress(tensor_name, done, total): called after each tensor."""

ENCODE_MODES = ("auto", "raw", "uniform")
MIN_UNIFORM_ELEMENTS = 256  # smaller float tensors: raw (side data would outweigh the gain)


# --- decoding -----------------------------------------------------------------------------------

def _layout(limits: Limits):
    def layout(index: int, record: TensorRecord, records: Sequence[TensorRecord]) -> tuple[int, ...]:
        if record.numel * record.itemsize > limits.max_tensor_bytes:
            raise fail("LIMIT_EXCEEDED", f"tensor {record.name!r} would decode to "
                                         f"{record.numel * record.itemsize} bytes (this reader's limit is "
                                         f"{limits.max_tensor_bytes})")
        return modes.stream_items(index, record, records)
    return layout


def _decode_chunks(tc: TensorChunks) -> torch.Tensor:
    try:
        arr = modes.decode(tc.record, tc.streams)
    except TqzError:
        raise
    except (ValueError, OverflowError, TypeError, IndexError, MemoryError) as exc:
        raise fail("BAD_PAYLOAD", f"tensor {tc.record.name!r} does not decode ({type(exc).__name__}: {exc})") from None
    return storage_to_tensor(tc.record.dtype, arr)


@contextlib.contextmanager
def _naming(path: Optional[PathLike]) -> Iterator[None]:
    """Attach ``path`` to every TqzError; turn OS errors into IO_ERROR."""
    try:
        yield
    except TqzError as exc:
        raise (exc.with_path(path) if path is not None else exc) from None
    except OSError as exc:
        raise fail("IO_ERROR", f"cannot read: {exc.strerror or exc}", path) from None


def iter_tensors(source: Union[PathLike, BinaryIO, bytes], *,
                 limits: Limits = DEFAULT_LIMITS) -> Iterator[tuple[str, torch.Tensor]]:
    """Decode front to back (spec §10.1), yielding ``(name, tensor)`` as each completes.

    ``source`` may be a path, bytes, or any readable binary file object, seekable or not
    (a pipe, a socket, an HTTP response body). Every check of the spec is made; an error
    may therefore come after some tensors were yielded.
    """
    path = source if isinstance(source, (str, os.PathLike)) else None
    with _naming(path), contextlib.ExitStack() as stack:
        if isinstance(source, (bytes, bytearray, memoryview)):
            f: BinaryIO = io.BytesIO(bytes(source))
        elif path is not None:
            f = stack.enter_context(builtins.open(path, "rb"))
        else:
            f = source  # type: ignore[assignment]
        done: dict[int, torch.Tensor] = {}
        records: list[TensorRecord] = []
        for tc in iter_chunks_front_to_back(f, _layout(limits),
                                            on_manifest=lambda h, m: records.extend(m.tensors)):
            if tc.record.mode == "alias":
                tensor = done[tc.record.params["of"]]
            else:
                tensor = _decode_chunks(tc)
            if any(r.mode == "alias" and r.params.get("of") == tc.index for r in records):
                done[tc.index] = tensor
            yield tc.record.name, tensor


def load(path: Union[PathLike, BinaryIO, bytes], *, limits: Limits = DEFAULT_LIMITS) -> dict[str, torch.Tensor]:
    """Decode a whole .tqz file into ``{name: tensor}`` in file order (tied tensors shared)."""
    return dict(iter_tensors(path, limits=limits))


@dataclass(frozen=True)
class TensorInfo:
    """What the manifest and index say of one tensor."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    mode: str
    params: Mapping[str, Any]
    stored_bytes: int  # bytes of its chunks in the file (headers included)

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


class TqzFile:
    """A .tqz file opened for random access (spec §10.2): ``keys()``, ``metadata``,
    ``get_tensor(name)`` reading only that tensor's bytes. Use as a context manager."""

    def __init__(self, source: Union[PathLike, bytes], *, limits: Limits = DEFAULT_LIMITS):
        self.path = None if isinstance(source, (bytes, bytearray)) else os.fspath(source)
        self._file: Optional[BinaryIO] = None
        with _naming(self.path):
            if self.path is None:
                data = bytes(source)  # type: ignore[arg-type]
                read_at = lambda off, n: data[off:off + n]  # noqa: E731
                size = len(data)
            else:
                self._file = builtins.open(self.path, "rb")
                size = os.fstat(self._file.fileno()).st_size
                read_at = file_reader(self._file)
            try:
                self._reader = RandomAccessReader(read_at, size, _layout(limits))
            except TqzError as exc:
                # spec §10.2: a file without a valid footer may be truncated or extended;
                # the front-to-back order names what is wrong
                if exc.code in ("BAD_INDEX", "TRUNCATED", "CHECKSUM_MISMATCH"):
                    self._diagnose(read_at, size, limits)
                self.close()
                raise
        m = self._reader.manifest
        self._by_name = {r.name: i for i, r in enumerate(m.tensors)}

    @staticmethod
    def _diagnose(read_at: Callable[[int, int], bytes], size: int, limits: Limits) -> None:
        class _Seq(io.RawIOBase):
            pos = 0

            def readable(self) -> bool:
                return True

            def readinto(self, b) -> int:  # type: ignore[override]
                data = read_at(self.pos, min(len(b), size - self.pos))
                b[:len(data)] = data
                self.pos += len(data)
                return len(data)

        for _ in iter_chunks_front_to_back(io.BufferedReader(_Seq(), 1 << 20), _layout(limits)):
            pass

    # mapping-like surface
    @property
    def metadata(self) -> Mapping[str, Any]:
        return self._reader.manifest.metadata

    @property
    def version(self) -> tuple[int, int]:
        return self._reader.header.major, self._reader.header.minor

    def keys(self) -> list[str]:
        return [r.name for r in self._reader.manifest.tensors]

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self._reader.manifest.tensors)

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def _index(self, name: str) -> int:
        try:
            return self._by_name[name]
        except KeyError:
            raise KeyError(name) from None

    def info(self, name: str) -> TensorInfo:
        i = self._index(name)
        r = self._reader.manifest.tensors[i]
        return TensorInfo(r.name, r.dtype, r.shape, r.mode, r.params, self._reader.spans[i][1])

    def get_tensor(self, name: str) -> torch.Tensor:
        """Decode one tensor, reading only its span (and its alias target's)."""
        i = self._index(name)
        record = self._reader.manifest.tensors[i]
        if record.mode == "alias":
            return self.get_tensor(self._reader.manifest.tensors[record.params["of"]].name)
        with _naming(self.path):
            return _decode_chunks(self._reader.tensor_chunks(i))

    @property
    def file_size(self) -> int:
        return self._reader.size

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> "TqzFile":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open(path: Union[PathLike, bytes], *, limits: Limits = DEFAULT_LIMITS) -> TqzFile:  # noqa: A001
    """Open a .tqz file for random access; see :class:`TqzFile`."""
    return TqzFile(path, limits=limits)


@dataclass(frozen=True)
class VerifyReport:
    tensors: int
    parameters: int
    file_bytes: int


def verify(path: PathLike, *, limits: Limits = DEFAULT_LIMITS, progress: Progress = None) -> VerifyReport:
    """Check every CRC and structure front to back and decode every tensor (spec §10.1)."""
    n = params = 0
    for name, t in iter_tensors(path, limits=limits):
        n += 1
        params += t.numel()
        if progress:
            progress(name, n, 0)
    return VerifyReport(n, params, os.path.getsize(path))


# --- encoding -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class EncodeOptions:
    """What ``save`` does with each tensor.

    mode: ``auto`` (uniform for float tensors of >= 2 dims and >= 256 elements, raw for the
    rest), ``raw`` (everything exact) or ``uniform`` (every finite float tensor).
    lossless: everything exact (same as mode ``raw``).
    snr_db: weight signal-to-quantization-noise ratio each uniform step aims at.
    granularity: ``channel`` (one step per output channel) or ``tensor``.
    """

    mode: str = "auto"
    lossless: bool = False
    snr_db: float = 40.0
    granularity: str = "channel"

    def __post_init__(self) -> None:
        if self.mode not in ENCODE_MODES:
            raise fail("BAD_OPTION", f"mode {self.mode!r} is not one of {', '.join(ENCODE_MODES)}")
        if not (isinstance(self.snr_db, (int, float)) and np.isfinite(self.snr_db) and 0 < self.snr_db <= 200):
            raise fail("BAD_OPTION", f"snr_db must be in (0, 200], got {self.snr_db!r}")
        if self.granularity not in uniform.GRANULARITIES:
            raise fail("BAD_OPTION", f"granularity {self.granularity!r} is not one of tensor, channel")


def _alias_key(t: torch.Tensor) -> Optional[tuple]:
    if t.numel() == 0:
        return None
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)


def _encode_raw(arr: np.ndarray) -> tuple[dict, list]:
    """Raw with zstd where it saves bytes, else uncompressed."""
    params, streams = raw.encode(arr, "zstd")
    packed = sum(len(p) for p in (c[1] for c in streams[0]))
    if packed >= arr.nbytes:
        return raw.encode(arr, "none")
    return params, streams


def _encode_one(name: str, t: torch.Tensor, opts: EncodeOptions) -> tuple[str, dict, list]:
    dtype, arr = tensor_to_storage(t)
    use_uniform = (not opts.lossless and opts.mode != "raw" and dtype in FLOAT_NAMES and arr.size >= 1
                   and (opts.mode == "uniform" or (arr.ndim >= 2 and arr.size >= MIN_UNIFORM_ELEMENTS)))
    if use_uniform:
        values = storage_to_float64(dtype, arr)
        if not np.isfinite(values).all():
            warnings.warn(f"{name}: NaN or infinite values, stored exactly (raw)", stacklevel=3)
        else:
            params, streams = uniform.encode(values, dtype, opts.granularity, opts.snr_db)
            return "uniform", params, streams
    params, streams = _encode_raw(arr)
    return "raw", params, streams


def save(tensors: Mapping[str, torch.Tensor], path: Union[PathLike, BinaryIO], *,
         mode: str = "auto", lossless: bool = False, snr_db: float = 40.0, granularity: str = "channel",
         metadata: Optional[Mapping[str, Any]] = None, overwrite: bool = True,
         progress: Progress = None) -> int:
    """Encode ``tensors`` into a .tqz file at ``path`` (or a writable binary file object).

    Deterministic: the same tensors and options give the same bytes. Tensors that share
    storage (tied weights) are stored once. Returns the number of bytes written. The file
    appears only when complete (temporary file, fsync, rename).
    """
    opts = EncodeOptions(mode, lossless, snr_db, granularity)
    meta = {"tqz.encoder": f"tqcodec {_version}"}
    if metadata:
        for k in metadata:
            if not isinstance(k, str) or k.startswith("tqz."):
                raise fail("BAD_OPTION", f"metadata key {k!r} must be a string not starting with 'tqz.'")
        meta.update(metadata)
    pack_canonical(meta)  # raises BAD_OPTION for values the manifest cannot hold
    items = list(tensors.items())
    for name, t in items:
        try:
            check_name(name)
        except TqzError as exc:
            raise fail("BAD_INPUT", exc.message) from None
        if not isinstance(t, torch.Tensor):
            raise fail("BAD_INPUT", f"{name!r} is a {type(t).__name__}, not a tensor")
        if t.is_complex():
            raise fail("BAD_INPUT", f"{name!r} has complex dtype {t.dtype}, which tqcodec refuses")

    def write(out: BinaryIO) -> int:
        writer = ContainerWriter(out)
        first_of: dict[tuple, int] = {}
        for i, (name, t) in enumerate(items):
            key = _alias_key(t)
            dtype = name_of_torch(t.dtype)
            if key is not None and key in first_of:
                rec = TensorRecord(name, dtype, tuple(t.shape), "alias", alias.encode_params(first_of[key]))
                writer.add_tensor(rec, [])
            else:
                if key is not None:
                    first_of[key] = i
                mode_name, params, streams = _encode_one(name, t, opts)
                writer.add_tensor(TensorRecord(name, dtype, tuple(t.shape), mode_name, params), streams)
            if progress:
                progress(name, i + 1, len(items))
        return writer.finish(meta)

    if isinstance(path, (str, os.PathLike)):
        with atomic_output(path, overwrite) as f:
            return write(f)
    return write(path)


def encode_bytes(tensors: Mapping[str, torch.Tensor], **options: Any) -> bytes:
    """``save`` into memory; returns the file's bytes."""
    buf = io.BytesIO()
    save(tensors, buf, **options)
    return buf.getvalue()
