"""The Python API: save, load, open, iter_tensors, verify.

This module joins the container (``format``), the coding modes (``modes``) and torch.
"""
from __future__ import annotations

import math

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
from . import modes, remote
from .dtypes import FLOAT_NAMES, all_finite, name_of_torch, storage_to_float64, storage_to_tensor, tensor_to_storage
from .errors import TqzError, fail
from .fileio import atomic_output, check_tensor
from .format.container import (ContainerWriter, RandomAccessReader, TensorChunks, file_reader,
                               iter_chunks_front_to_back, parse_header)
from .format.manifest import TensorRecord, check_name, pack_canonical
from .limits import DEFAULT_LIMITS, Limits
from .modes import alias, raw, uniform

PathLike = Union[str, os.PathLike]
Progress = Optional[Callable[[str, int, int], None]]
"""progress(tensor_name, done, total): called after each tensor."""

LINEAGE_MODES = ("ecsq", "kmeans", "pq", "dither")  # spec §7.6-§7.9; encoders in tqcodec.lineage
ENCODE_MODES = ("auto", "raw", "uniform", "tq") + LINEAGE_MODES
MIN_UNIFORM_ELEMENTS = 256  # smaller float tensors: raw (side data would outweigh the gain)
AUTO_BITS_TOLERANCE = 0.03  # mode auto with bits: a file with other modes in it must land this close, else tq alone


# --- decoding -----------------------------------------------------------------------------------

def _layout(limits: Limits):
    def layout(index: int, record: TensorRecord, records: Sequence[TensorRecord]) -> tuple[int, ...]:
        if record.numel * record.itemsize > limits.max_tensor_bytes:
            raise fail("LIMIT_EXCEEDED", f"tensor {record.name!r} would decode to "
                                         f"{record.numel * record.itemsize} bytes (this reader's limit is "
                                         f"{limits.max_tensor_bytes})")
        # an empty tensor whose other dimensions multiply past 2^63 bytes (e.g. [2^40, 2^40, 0]) is
        # valid but has no numpy/torch shape: refuse it as this reader's resource limit (spec §12),
        # not as BAD_PAYLOAD (conformance/may_reject/empty_tensor_huge_dims)
        span = record.itemsize
        for d in record.shape:
            span *= max(d, 1)
        if span >= 1 << 63:
            raise fail("LIMIT_EXCEEDED", f"tensor {record.name!r}: shape {list(record.shape)} cannot be "
                                         "represented by this reader (dimensions multiply past 2^63 bytes)")
        return modes.stream_items(index, record, records)
    return layout


def _decode_chunks(tc: TensorChunks) -> torch.Tensor:
    try:
        arr = modes.decode(tc.record, tc.streams)
    except TqzError:
        raise
    except MemoryError:  # spec §12: a resource limit of this reader, not a fault of the file
        raise fail("LIMIT_EXCEEDED", f"tensor {tc.record.name!r}: out of memory while decoding") from None
    except (ValueError, OverflowError, TypeError, IndexError, KeyError, ArithmeticError) as exc:
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
    (a pipe, a socket, an HTTP response body), or a URL (``http(s)://``, or any scheme fsspec has
    a plugin for; needs ``tqcodec[remote]``), read with one request as it arrives. Memory: the
    tensor being decoded and its chunks, not the file. Every check of the spec is made; an error
    may therefore come after some tensors were yielded.
    """
    path = source if isinstance(source, (str, os.PathLike)) else None
    with _naming(path), contextlib.ExitStack() as stack:
        if isinstance(source, (bytes, bytearray, memoryview)):
            f: BinaryIO = io.BytesIO(bytes(source))
        elif path is not None and remote.is_url(path):
            f = stack.enter_context(remote.open_stream(path))  # one GET, decoded as it arrives
        elif path is not None:
            f = stack.enter_context(builtins.open(path, "rb"))
        else:
            f = source  # type: ignore[assignment]
        done: dict[int, torch.Tensor] = {}
        targets: set = set()  # indices some alias refers to (a set: one pass, not one per tensor)
        for tc in iter_chunks_front_to_back(f, _layout(limits), on_manifest=lambda h, m: targets.update(
                r.params.get("of") for r in m.tensors if r.mode == "alias"),
                max_manifest_length=limits.max_manifest_bytes):
            if tc.record.mode == "alias":
                tensor = done[tc.record.params["of"]]
            else:
                tensor = _decode_chunks(tc)
            if tc.index in targets:
                done[tc.index] = tensor
            yield tc.record.name, tensor
            del tc, tensor  # hold no finished tensor (or its chunks) while the next one arrives


def load(path: Union[PathLike, BinaryIO, bytes], *, limits: Limits = DEFAULT_LIMITS,
         jobs: int = 1) -> dict[str, torch.Tensor]:
    """Decode a whole .tqz file into ``{name: tensor}`` in file order (tied tensors shared).

    ``jobs`` > 1 (0: every core; a local file only): tensors decode in a process pool by random
    access (``tqcodec.parallel.iter_decoded``); the tensors are the same for every ``jobs``."""
    from . import parallel
    return dict(parallel.iter_decoded(path, parallel.check_jobs(jobs), limits))


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
        return math.prod(self.shape)


class TqzFile:
    """A .tqz file opened for random access (spec §10.2): ``keys()``, ``metadata``,
    ``get_tensor(name)`` reading only that tensor's bytes. Use as a context manager."""

    def __init__(self, source: Union[PathLike, bytes], *, limits: Limits = DEFAULT_LIMITS):
        self.path = None if isinstance(source, (bytes, bytearray)) else os.fspath(source)
        self._file: Optional[BinaryIO] = None
        self.remote: Optional[remote.RangeSource] = None  # URL: requests and bytes read so far
        with _naming(self.path):
            if self.path is None:
                data = bytes(source)  # type: ignore[arg-type]
                read_at = lambda off, n: data[off:off + n]  # noqa: E731
                size = len(data)
            elif remote.is_url(self.path):
                self.remote = remote.open_range(self.path)
                size, read_at = self.remote.size, self.remote.read_at
            else:
                self._file = builtins.open(self.path, "rb")
                size = os.fstat(self._file.fileno()).st_size
                read_at = file_reader(self._file)
            try:
                self._reader = RandomAccessReader(read_at, size, _layout(limits),
                                                  max_manifest_length=limits.max_manifest_bytes)
            except TqzError as exc:
                # spec §10.2: a file without a valid footer may be truncated or extended;
                # the front-to-back order names what is wrong
                # (remote: only if the first request read it all, so the requests stay bounded)
                if exc.code in ("BAD_INDEX", "TRUNCATED", "CHECKSUM_MISMATCH") and (
                        self.remote is None or self.remote.fully_cached):
                    self._diagnose(read_at, size, limits)
                elif exc.code in ("BAD_INDEX", "TRUNCATED", "CHECKSUM_MISMATCH"):
                    parse_header(read_at(0, 32))  # one more request: name a file that is no .tqz at all
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

        for _ in iter_chunks_front_to_back(io.BufferedReader(_Seq(), 1 << 20), _layout(limits),
                                           max_manifest_length=limits.max_manifest_bytes):
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

    def get_parts(self, name: str) -> Optional[dict]:
        """A ``tq`` tensor's integer stage (levels per band, steps, transform; see
        ``tqcodec.modes.tq.decode_parts``), reading only its span; None for other modes."""
        i = self._index(name)
        record = self._reader.manifest.tensors[i]
        if record.mode == "alias":
            return self.get_parts(self._reader.manifest.tensors[record.params["of"]].name)
        if record.mode != "tq":
            return None
        from .modes import tq as tq_mode
        with _naming(self.path):
            tc = self._reader.tensor_chunks(i)
            try:
                return tq_mode.decode_parts(tc.record, tc.streams)
            except TqzError:
                raise
            except (ValueError, OverflowError, TypeError, IndexError, KeyError, ArithmeticError) as exc:
                raise fail("BAD_PAYLOAD", f"tensor {name!r} does not decode ({type(exc).__name__}: {exc})") from None

    @property
    def file_size(self) -> int:
        return self._reader.size

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self.remote is not None:
            self.remote.close()

    def __enter__(self) -> "TqzFile":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open(path: Union[PathLike, bytes], *, limits: Limits = DEFAULT_LIMITS) -> TqzFile:  # noqa: A001
    """Open a .tqz file (a path, bytes, or a URL: ``http(s)://``, ``s3://``, ... with
    ``tqcodec[remote]``) for random access; see :class:`TqzFile`. Over HTTP: at most 3 range
    requests for footer, index, header and manifest (2 when the index fits in the last 64 KiB),
    then one per tensor read."""
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
    rest; with stats, bits or quality: tq, and per tensor of >= 2 dims and >= 256 elements
    whichever of tq, ecsq, kmeans, pq, dither has the least D + lam R at tq's multiplier),
    ``raw`` (everything exact), ``uniform`` (every finite float tensor), ``tq``, or one of
    ``ecsq``, ``kmeans``, ``pq``, ``dither`` (spec §7.6-§7.9: float tensors of >= 2 dims and
    >= 256 elements in that mode, the rest as ``auto`` without statistics; ``bits`` is then each
    tensor's own bits per weight, else ``quality`` or ``snr_db`` a weighted SNR target; stats
    weigh each weight by its input's second moment).
    lossless: everything exact (same as mode ``raw``).
    snr_db: weight signal-to-quantization-noise ratio each uniform step aims at.
    granularity: ``channel`` (one step per output channel) or ``tensor``.
    stats: ``tqcodec.Stats`` from ``tqcodec.calibrate`` (mode ``tq``; with ``auto`` it selects tq).
    bits: mode ``tq``: whole-file bits per parameter (the file lands within ±3%).
    quality: mode ``tq``: predicted output SNR in dB (output power over the estimated output
    error, spec-free encoder choice); without stats, weight SNR. Default 40 when neither is given.
    tq_scope: mode ``tq``: ``model`` (one allocation over the whole model: every tensor in memory)
    or ``tensor`` (each tensor on its own to ``bits``/``quality``: streams tensor by tensor and
    runs with ``jobs``; ``tqcodec.parallel``).
    """

    mode: str = "auto"
    lossless: bool = False
    snr_db: float = 40.0
    granularity: str = "channel"
    stats: Any = None
    bits: Optional[float] = None
    quality: Optional[float] = None
    tq_scope: str = "model"

    @property
    def uses_tq(self) -> bool:
        """Mode ``tq`` explicitly, or ``auto`` with stats, bits or quality given."""
        if self.lossless or self.mode in ("raw", "uniform") + LINEAGE_MODES:
            return False
        return self.mode == "tq" or any(v is not None for v in (self.stats, self.bits, self.quality))

    def __post_init__(self) -> None:
        if self.mode not in ENCODE_MODES:
            raise fail("BAD_OPTION", f"mode {self.mode!r} is not one of {', '.join(ENCODE_MODES)}")
        if not (isinstance(self.snr_db, (int, float)) and np.isfinite(self.snr_db) and 0 < self.snr_db <= 200):
            raise fail("BAD_OPTION", f"snr_db must be in (0, 200], got {self.snr_db!r}")
        if self.granularity not in uniform.GRANULARITIES:
            raise fail("BAD_OPTION", f"granularity {self.granularity!r} is not one of tensor, channel")
        if self.bits is not None and not (isinstance(self.bits, (int, float)) and 0.05 <= self.bits <= 32):
            raise fail("BAD_OPTION", f"bits must be in [0.05, 32], got {self.bits!r}")
        if self.quality is not None and not (isinstance(self.quality, (int, float)) and 0 < self.quality <= 200):
            raise fail("BAD_OPTION", f"quality must be in (0, 200] dB, got {self.quality!r}")
        if self.bits is not None and self.quality is not None:
            raise fail("BAD_OPTION", "give bits or quality, not both")
        if self.tq_scope not in ("model", "tensor"):
            raise fail("BAD_OPTION", f"tq_scope must be 'model' or 'tensor', got {self.tq_scope!r}")


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


def _encode_lineage(name: str, dtype: str, values: np.ndarray, opts: EncodeOptions) -> tuple[str, dict, list]:
    """Modes ecsq, kmeans, pq, dither (spec §7.6-§7.9) for one finite float tensor."""
    from .lineage import encode_tensor
    snr = opts.quality if opts.quality is not None else opts.snr_db
    res = encode_tensor(opts.mode, name, values, dtype, opts.stats, bits=opts.bits, snr_db=snr)
    return res.mode, res.params, res.streams


def _encode_one(name: str, t: torch.Tensor, opts: EncodeOptions) -> tuple[str, dict, list]:
    dtype, arr = tensor_to_storage(t)
    if (opts.mode in LINEAGE_MODES and not opts.lossless and dtype in FLOAT_NAMES and arr.ndim >= 2
            and arr.size >= MIN_UNIFORM_ELEMENTS):
        values = storage_to_float64(dtype, arr)
        if np.isfinite(values).all():
            return _encode_lineage(name, dtype, values, opts)
    use_uniform = (not opts.lossless and opts.mode != "raw" and dtype in FLOAT_NAMES and arr.size >= 1
                   and (opts.mode == "uniform" or (arr.ndim >= 2 and arr.size >= MIN_UNIFORM_ELEMENTS)))
    if use_uniform:
        if not all_finite(dtype, arr):
            warnings.warn(f"{name}: NaN or infinite values, stored exactly (raw)", stacklevel=3)
        else:  # block by block: bounded memory however large the tensor
            params, streams = uniform.encode_storage(arr, dtype, opts.granularity, opts.snr_db)
            return "uniform", params, streams
    params, streams = _encode_raw(arr)
    return "raw", params, streams


def save(tensors: Mapping[str, torch.Tensor], path: Union[PathLike, BinaryIO], *,
         mode: str = "auto", lossless: bool = False, snr_db: float = 40.0, granularity: str = "channel",
         metadata: Optional[Mapping[str, Any]] = None, overwrite: bool = True,
         progress: Progress = None, stats: Any = None, bits: Optional[float] = None,
         quality: Optional[float] = None, jobs: int = 1, files: Optional[Mapping[str, bytes]] = None,
         tq_scope: str = "model", executor: Any = None) -> int:
    """Encode ``tensors`` into a .tqz file at ``path`` (or a writable binary file object).

    Deterministic: the same tensors and options give the same bytes. Tensors that share
    storage (tied weights) are stored once. Returns the number of bytes written. The file
    appears only when complete (temporary file, fsync, rename).

    ``tensors`` may be lazy (``tqcodec.hf.LazyTensors``: values loaded one at a time), and
    ``jobs`` > 1 (0: every core) encodes tensors in a process pool (``tqcodec.parallel``); both
    stream tensor by tensor and give the same bytes as ``jobs=1`` (mode tq with ``tq_scope``
    ``model`` allocates over the whole model: it loads every tensor and runs in this process;
    ``tensor`` streams). ``executor``: a ``concurrent.futures.Executor`` to run the tensor
    encodes on instead of a local pool (e.g. dask's ``client.get_executor()``; same bytes).
    ``files``: small non-weight files (name -> bytes) carried in metadata ``tqz.files``
    (spec §5.2.1).
    """
    opts = EncodeOptions(mode, lossless, snr_db, granularity, stats, bits, quality, tq_scope)
    meta = {"tqz.encoder": f"tqcodec {_version}"}
    if metadata:
        for k in metadata:
            if not isinstance(k, str) or k.startswith("tqz."):
                raise fail("BAD_OPTION", f"metadata key {k!r} must be a string not starting with 'tqz.'")
        meta.update(metadata)
    if files:
        from .hf import check_files
        meta["tqz.files"] = check_files(files, "BAD_OPTION")
    pack_canonical(meta)  # raises BAD_OPTION for values the manifest cannot hold
    from . import parallel
    jobs = parallel.check_jobs(jobs)
    lazy = callable(getattr(tensors, "refs", None))
    streaming = jobs != 1 or lazy or executor is not None
    if (streaming and not opts.uses_tq) or (opts.uses_tq and opts.tq_scope == "tensor"):
        entries = parallel.plan_entries(tensors)

        def stream(out: BinaryIO) -> int:
            with ContainerWriter(out) as writer:
                parallel.write_entries(writer, entries, opts, jobs, progress, executor)
                return writer.finish(meta)
        if isinstance(path, (str, os.PathLike)):
            with atomic_output(path, overwrite) as f:
                return stream(f)
        return stream(path)
    items = list(tensors.items())
    for name, t in items:
        check_tensor(name, t)  # BAD_INPUT: bad name, not a plain dense tensor, dtype not in spec §5.5

    done: dict[str, tuple[str, dict, list]] = {}  # data-free results, kept across tq's trial writes

    def write(out: BinaryIO, pre: Mapping[str, tuple[str, dict, list]]) -> int:
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
                if name in pre:
                    mode_name, params, streams = pre[name]
                else:
                    if name not in done:
                        done[name] = _encode_one(name, t, opts)
                    mode_name, params, streams = done[name]
                writer.add_tensor(TensorRecord(name, dtype, tuple(t.shape), mode_name, params), streams)
            if progress:
                progress(name, i + 1, len(items))
        return writer.finish(meta)

    pre = _encode_tq(items, opts, lambda enc: write(io.BytesIO(), enc)) if opts.uses_tq else {}
    if isinstance(path, (str, os.PathLike)):
        with atomic_output(path, overwrite) as f:
            return write(f, pre)
    return write(path, pre)


def _encode_tq(items: Sequence[tuple[str, torch.Tensor]], opts: EncodeOptions,
               size_of: Callable[[Mapping[str, tuple[str, dict, list]]], int], transforms: bool = True) -> dict:
    """Mode tq (spec §7.5) for the tensors it takes (the rest: data-free path of ``_encode_one``).
    ``transforms``: offer transforms (off for row blocks of one tensor, which share no S)."""
    from .tq.encoder import Item, encode_model

    seen: set = set()
    tq_items = []
    total = 0
    for name, t in items:
        total += t.numel()
        key = _alias_key(t)
        if key is not None and key in seen:
            continue
        if key is not None:
            seen.add(key)
        dtype, arr = tensor_to_storage(t)
        if dtype in FLOAT_NAMES and arr.size:
            values = storage_to_float64(dtype, arr)
            if np.isfinite(values).all():
                tq_items.append(Item(name, dtype, values))
    if opts.mode == "auto":  # mode auto: per tensor, tq or a lineage mode by D + lam R (tqcodec.lineage.select)
        from .lineage.select import chooser_for
        enc = encode_model(tq_items, opts.stats, bits=opts.bits, quality=opts.quality, total_params=max(total, 1),
                           size_of=size_of, alternatives=chooser_for(tq_items, opts.stats), transforms=transforms)
        if opts.bits is None or all(m == "tq" for m, _, _ in enc.values()):
            return enc
        if abs(8.0 * size_of(enc) / (opts.bits * max(total, 1)) - 1.0) <= AUTO_BITS_TOLERANCE:
            return enc
        # the other modes' coarser rate steps kept the file off its bits target: tq alone meets it
    return encode_model(tq_items, opts.stats, bits=opts.bits, quality=opts.quality, total_params=max(total, 1),
                        size_of=size_of, transforms=transforms)


def encode_bytes(tensors: Mapping[str, torch.Tensor], **options: Any) -> bytes:
    """``save`` into memory; returns the file's bytes."""
    buf = io.BytesIO()
    save(tensors, buf, **options)
    return buf.getvalue()
