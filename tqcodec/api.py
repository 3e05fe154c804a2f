"""The Python API: save, load, open, iter_tensors, verify (and Hugging Face folders in and out).

A thin layer: encoding is ``tqcodec.pipeline``, files and sources ``tqcodec.io``, pools
``tqcodec.parallel``, the container ``tqcodec.format``.
"""
from __future__ import annotations

import io
import math
import os
import tempfile
import warnings
from dataclasses import dataclass
from typing import Any, BinaryIO, Callable, Iterator, Mapping, Optional, Union

import torch

from . import __version__ as _version
from . import parallel
from .coding import workers
from .errors import TqzError, TqzWarning, fail
from .format.dtypes import storage_bytes
from .format.header import ZSTD_MANIFEST
from .format.manifest import TensorRecord, pack_canonical
from .format.writer import ContainerWriter
from .io import hf, remote, sources
from .io.files import atomic_output
from .limits import DEFAULT_LIMITS, Limits
from .modes import alias
from .modes.base import Encoded
from .pipeline.classic import CLASSIC_MODES
from .pipeline import search
from .pipeline.encode import (EncodeOptions, encode_classic_file, encode_tensor, encode_tq, no_larger_than_raw,
                              tq_encoder)
from .pipeline.tensors import check_tensor, header_of, loaded, plan_entries, tensor_to_storage

PathLike = Union[str, os.PathLike]
Progress = Optional[Callable[[str, int, int], None]]
"""progress(what, done, total): called as long work advances. ``what`` is a stage, or a stage and
an item as ``"stage: item"`` (``"writing: fc1.weight"``); ``total`` is 0 when not known. Stages:
``curves``, ``transforms``, ``rate search`` (mode tq's allocation), ``writing``, ``decoding`` or
``encoding`` (each tensor into the file), ``verifying``."""

__all__ = ["EncodeOptions", "TensorInfo", "TqzFile", "VerifyReport", "decode_folder", "encode_bytes",
           "encode_folder", "iter_tensors", "load", "open", "save", "verify"]


# --- decoding -----------------------------------------------------------------------------------

def iter_tensors(source: Union[PathLike, BinaryIO, bytes], *,
                 limits: Limits = DEFAULT_LIMITS, jobs: Optional[int] = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Decode front to back (spec §10.1), yielding ``(name, tensor)`` as each completes.

    ``source`` may be a path, bytes, or any readable binary file object, seekable or not
    (a pipe, a socket, an HTTP response body), or a URL (``http(s)://``, or any scheme fsspec has
    a plugin for; needs ``tqcodec[remote]``), read with one request as it arrives. Memory: the
    tensor being decoded and its chunks, not the file (with ``jobs`` > 1 also up to 64 MiB of
    chunks read ahead). Every check of the spec is made; an error may therefore come after some
    tensors were yielded.

    ``jobs``: threads decoding range-coded chunks (None or 0: every CPU this process may use;
    1: this thread only). The tensors, their order and every error are the same for every
    ``jobs``; with ``jobs`` > 1 a file object is read ahead of the tensors yielded.
    """
    return sources.iter_tensors(source, limits, parallel.check_jobs(jobs))


def load(path: Union[PathLike, BinaryIO, bytes], *, limits: Limits = DEFAULT_LIMITS,
         jobs: Optional[int] = None) -> dict[str, torch.Tensor]:
    """Decode a whole .tqz file into ``{name: tensor}`` in file order (tied tensors shared).

    ``jobs``: threads decoding range-coded chunks (None or 0: every CPU this process may use;
    1: this thread only), for any source; the tensors are the same for every ``jobs``
    (``tqcodec.parallel.iter_decoded``). Ctrl-C stops the decode workers and raises
    KeyboardInterrupt, wherever in the decode it lands."""
    try:
        return dict(parallel.iter_decoded(path, parallel.check_jobs(jobs), limits))
    except KeyboardInterrupt:  # landed between two tensors: the generator was closed, not interrupted
        workers.abort()
        raise


@dataclass(frozen=True)
class TensorInfo:
    """What the manifest and index say of one tensor."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    mode: str
    params: Mapping[str, Any]
    stored_bytes: int  # bytes of its chunks in the file (headers included)
    offset: int = 0  # where its chunks start in the file (0 when it has none)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


class TqzFile:
    """A .tqz file opened for random access (spec §10.2): ``keys()``, ``metadata``,
    ``get_tensor(name)`` reading only that tensor's bytes, ``parts(name)`` its integer stage.
    Use as a context manager."""

    def __init__(self, source: Union[PathLike, bytes], *, limits: Limits = DEFAULT_LIMITS):
        self._file = sources.RandomAccess(source, limits)
        self.path = self._file.path
        self.remote: Optional[remote.RangeSource] = self._file.remote  # URL: requests and bytes read so far
        self._by_name = {r.name: i for i, r in enumerate(self._file.records)}

    @property
    def metadata(self) -> Mapping[str, Any]:
        return self._file.reader.manifest.metadata

    @property
    def files(self) -> dict[str, bytes]:
        """The small files the .tqz carries (a Hugging Face folder's config, tokenizer, ...;
        metadata ``tqz.files``, spec §5.2.1): name -> bytes."""
        return hf.check_files(self.metadata.get(hf.FILES_KEY, {}))

    @property
    def version(self) -> tuple[int, int]:
        return self._file.reader.header.major, self._file.reader.header.minor

    @property
    def manifest_bytes(self) -> tuple[int, bool]:
        """The manifest's bytes in the file, and whether they are one zstd frame (spec §5.0)."""
        header = self._file.reader.header
        return header.manifest_length, bool(header.required_features & ZSTD_MANIFEST)

    def keys(self) -> list[str]:
        return [r.name for r in self._file.records]

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self._file.records)

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def _index(self, name: str) -> int:
        try:
            return self._by_name[name]
        except KeyError:
            raise KeyError(name) from None

    def info(self, name: str) -> TensorInfo:
        i = self._index(name)
        r = self._file.records[i]
        offset, length = self._file.reader.spans[i]
        return TensorInfo(r.name, r.dtype, r.shape, r.mode, r.params, length, offset)

    def get_tensor(self, name: str) -> torch.Tensor:
        """Decode one tensor, reading only its span (and its alias target's)."""
        return self._file.tensor(self._index(name))

    def parts(self, name: str) -> dict:
        """One tensor's decoded integer stage, reading only its span (an alias: its target's):
        its mode's ``parts`` (``tqcodec.modes.<mode>.parts``: levels and steps, symbols and
        codebooks, ...), with the mode under ``"mode"``."""
        i = self._file.target(self._index(name))
        return {"mode": self._file.records[i].mode, **self._file.parts(i)}

    def encoded(self, name: str) -> Encoded:
        """One tensor as stored: its mode, params and streams (CRC-checked, not decoded), e.g.
        to copy it unchanged into another file."""
        i = self._index(name)
        with sources.naming(self.path):
            tc = self._file.reader.tensor_chunks(i)
        return Encoded(tc.record.mode, dict(tc.record.params), tc.streams)

    def get_parts(self, name: str) -> Optional[dict]:
        """A ``tq`` tensor's :meth:`parts`; None for other modes."""
        i = self._file.target(self._index(name))
        return self.parts(name) if self._file.records[i].mode == "tq" else None

    @property
    def file_size(self) -> int:
        return self._file.reader.size

    def close(self) -> None:
        self._file.close()

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


def verify(source: Union[PathLike, BinaryIO, bytes], *, limits: Limits = DEFAULT_LIMITS,
           progress: Progress = None) -> VerifyReport:
    """Check every CRC and structure front to back and decode every tensor (spec §10.1).
    ``source``: a path, bytes, a URL or a readable binary stream (standard input, a pipe)."""
    n = params = 0
    with sources.naming(sources.path_of(source)), sources.open_stream(source) as stream:
        counted = sources.CountingReader(stream)
        for name, t in iter_tensors(counted, limits=limits):
            n += 1
            params += t.numel()
            if progress:
                progress(f"verifying: {name}", n, 0)
    return VerifyReport(n, params, counted.count)


# --- encoding -----------------------------------------------------------------------------------

def save(tensors: Mapping[str, torch.Tensor], path: Union[PathLike, BinaryIO], *,
         mode: Optional[str] = None, lossless: bool = False, snr_db: Optional[float] = None,
         granularity: Optional[str] = None, metadata: Optional[Mapping[str, Any]] = None, overwrite: bool = False,
         progress: Progress = None, stats: Any = None, bits: Optional[float] = None,
         quality: Optional[float] = None, jobs: int = 1, files: Optional[Mapping[str, bytes]] = None,
         tq_scope: str = "model", executor: Any = None, evaluate: Optional[Callable[[str], float]] = None,
         threshold: Optional[float] = None, higher_is_better: bool = True,
         tolerance: Optional[float] = None) -> int:
    """Encode ``tensors`` into a .tqz file at ``path`` (or a writable binary file object).

    Deterministic: the same tensors and options give the same bytes. Tensors that share
    storage (tied weights) are stored once. Returns the number of bytes written. The file
    appears only when complete (temporary file, fsync, rename); an existing file is replaced only
    with ``overwrite=True`` (else ``OUTPUT_EXISTS``, as ``tqz encode`` without ``--force``).
    Options: :class:`EncodeOptions`.

    ``tensors`` may be lazy (``tqcodec.io.hf.LazyTensors``: values loaded one at a time), and
    ``jobs`` > 1 (0: every core) encodes tensors in a process pool (``tqcodec.parallel``); both
    stream tensor by tensor and give the same bytes as ``jobs=1`` (mode tq with ``tq_scope``
    ``model`` allocates over the whole model: it loads every tensor and runs in this process;
    ``tensor`` streams). ``executor``: a ``concurrent.futures.Executor`` to run the tensor
    encodes on instead of a local pool (e.g. dask's ``client.get_executor()``; same bytes).
    ``files``: small non-weight files (name -> bytes) carried in metadata ``tqz.files``
    (spec §5.2.1).

    ``evaluate``, ``threshold``: the smallest file that keeps a metric. ``evaluate(path)`` is
    called with the path of a candidate .tqz file (temporary, removed afterwards) and returns its
    metric; the encoder searches the rate (mode tq: the curves are made once, each trial costs an
    allocation, the coding and the evaluation) and writes the smallest candidate whose metric is
    at least ``threshold`` (at most, with ``higher_is_better=False``). The trials are kept in the
    file's metadata ``tqz.search`` (spec §5.2.1). ``tolerance``: the search stops once the
    passing file is within this fraction of the largest failing one (default 0.03; smaller costs
    more trials). Refused with ``bits``, ``quality``, a mode other than tq, ``lossless`` and
    ``tq_scope="tensor"``; an evaluation that raises or gives no number is ``EVALUATE_FAILED``; no
    rate up to 16 bits/param passing, ``METRIC_NOT_MET`` (nothing written).
    """
    if evaluate is not None or threshold is not None or tolerance is not None:
        return _save_searching(tensors, path, evaluate, threshold, higher_is_better, mode=mode, lossless=lossless,
                               snr_db=snr_db, granularity=granularity, metadata=metadata, overwrite=overwrite,
                               progress=progress, stats=stats, bits=bits, quality=quality, files=files,
                               tq_scope=tq_scope, tolerance=tolerance)
    opts = EncodeOptions(mode, lossless, snr_db, granularity, stats, bits, quality, tq_scope)
    _check_stats_names(stats, tensors)
    meta = _file_metadata(metadata, files)
    jobs = parallel.check_jobs(jobs)
    lazy = callable(getattr(tensors, "refs", None))
    streaming = jobs != 1 or lazy or executor is not None
    if (streaming and not opts.uses_tq) or (opts.uses_tq and opts.tq_scope == "tensor"):
        entries = plan_entries(tensors.refs() if lazy else list(tensors.items()))

        def stream(out: BinaryIO) -> int:
            with ContainerWriter(out) as writer:
                parallel.write_entries(writer, entries, opts, jobs, progress, executor)
                return writer.finish(meta)
        return _write_to(path, overwrite, stream)
    items = _checked_items(tensors)
    entries = plan_entries(items)
    write = _file_writer(entries, opts, meta, progress)

    encoder = None
    if opts.uses_tq and opts.mode != "auto":
        encoder = tq_encoder(items, opts, lambda enc: write(None, enc), progress=progress)
        pre = encoder.encode(bits=opts.bits, quality=opts.quality)
        _warn_if_data_free_and_coarse(opts, encoder.predicted_snr_db)
    elif opts.uses_tq:
        pre = encode_tq(items, opts, lambda enc: write(None, enc), progress=progress)
    elif opts.mode in CLASSIC_MODES and opts.bits is not None:  # the whole file on its bits target
        pre = encode_classic_file(items, opts, lambda enc: write(None, enc), progress=progress)
    else:
        pre = {}
    size = _write_to(path, overwrite, lambda out: write(out, pre))
    if encoder is not None and opts.bits is not None:
        _warn_if_off_target(opts.bits, size, encoder.total_params)
    return size


BITS_MISS_WARN = 0.1
"""A file more than this fraction off its ``bits`` target gets a warning: the rate search lands
within 1.5% on the benchmark models; a model of a few thousand parameters cannot go below its
container's fixed parts (a 2,764-parameter conv net at --bits 1 came out at 2.30 bits/param, its
manifest 320 of its 796 bytes)."""


def _warn_if_off_target(bits: float, size: int, params: int) -> None:
    """A warning when the file of ``size`` bytes is more than ``BITS_MISS_WARN`` off ``bits`` per
    parameter (``params``: those the encoder's target counts, tied tensors once)."""
    got = 8.0 * size / max(params, 1)
    if abs(got / bits - 1.0) <= BITS_MISS_WARN:
        return
    why = (": the file's fixed parts (header, manifest, index) take much of so small a budget" if got > bits
           else ": no coarser or finer coding was found nearer to it")
    warnings.warn(f"--bits {bits:g} could not be met: the file is {got:.3f} bits/param ({size:,} bytes for "
                  f"{params:,} parameters){why}", TqzWarning, stacklevel=3)


DATA_FREE_WARN_DB = 30.0
"""Data-free tq whose predicted weight SNR is below this gets a warning: on the benchmark models the
smallest transparent data-free files had 21.2 dB (digits, 2.25 bits/param, every larger file
transparent too) and 28.7 dB (MiniLM, 4.4 bits/param; 27.8 dB at 4.25 was not; rd.py, 2026-12-06
09:57-10:21): a warning just above where files start to fail, while calibrated files are
transparent far lower (benchmarks/results/rd.md). The SNR
weighs each tensor's power and error by its gain (an embedding table's is 1/16 without statistics;
bias and norm vectors are left out of the power)."""


def _warn_if_data_free_and_coarse(opts: EncodeOptions, snr_db: Optional[float]) -> None:
    if opts.stats is not None or snr_db is None or snr_db >= DATA_FREE_WARN_DB:
        return
    rate = f"--bits {opts.bits:g}" if opts.bits is not None else f"--quality {opts.quality:g}"
    warnings.warn(f"data-free tq at {rate} is predicted at {snr_db:.1f} dB weight SNR: without calibration "
                  f"statistics, below about {DATA_FREE_WARN_DB:.0f} dB a model may lose accuracy. Check it "
                  "(--evaluate CMD --min X finds the smallest file that keeps your metric) or calibrate "
                  "(tqz calibrate, --stats)", TqzWarning, stacklevel=3)


def _check_stats_names(stats: Any, tensors: Mapping[str, Any]) -> None:
    """BAD_OPTION when statistics name none of the tensors (statistics of another model, or of
    the same model under other names): they would be silently ignored."""
    keys = getattr(stats, "keys", None)
    if stats is None or keys is None:
        return
    names = list(keys())
    if names and not any(n in tensors for n in names):
        have = next(iter(tensors), None)
        raise fail("BAD_OPTION", f"the statistics name none of the model's {len(tensors)} tensors (they name "
                                 f"{names[0]!r}, ...; the model has {have!r}, ...): statistics of another model?")


def _checked_items(tensors: Mapping[str, Any]) -> list:
    """``(name, value)`` of every tensor for mode tq over the whole model: a lazy mapping's
    references stay lazy (loaded where the encoder needs them, a few at a time, and checked
    then); tensors in memory are checked here (BAD_INPUT: a bad name, not a plain dense tensor,
    a dtype spec §5.5 lacks)."""
    if callable(getattr(tensors, "refs", None)):
        return tensors.refs()
    items = list(tensors.items())
    for name, t in items:
        check_tensor(name, t)
    return items


def _file_metadata(metadata: Optional[Mapping[str, Any]], files: Optional[Mapping[str, bytes]]) -> dict[str, Any]:
    """The file's metadata: the encoder's name, the caller's keys (checked: strings, not ``tqz.``)
    and the carried files (spec §5.2.1); BAD_OPTION for values the manifest cannot hold."""
    meta: dict[str, Any] = {"tqz.encoder": f"tqcodec {_version}"}
    for k in metadata or {}:
        if not isinstance(k, str) or k.startswith("tqz."):
            raise fail("BAD_OPTION", f"metadata key {k!r} must be a string not starting with 'tqz.'")
    meta.update(metadata or {})
    if files:
        meta[hf.FILES_KEY] = hf.check_files(files, "BAD_OPTION")
    pack_canonical(meta)
    return meta


def _file_writer(entries: list, opts: EncodeOptions, meta: Mapping[str, Any],
                 progress: Progress) -> Callable[..., int]:
    """``write(out, pre, extra_metadata={})``: the file of ``entries`` with the tensors of ``pre``
    as they are (never more bytes than stored exactly) and the rest encoded here (once: kept
    across trial writes), into ``out`` (None: a trial, only its size)."""
    done: dict[str, Encoded] = {}

    headers = [header_of(t) for _, t, _ in entries]  # a lazy tensor's from its file, nothing loaded

    def write(out: Optional[BinaryIO], pre: Mapping[str, Encoded], extra: Mapping[str, Any] = {}) -> int:
        writer = ContainerWriter(out if out is not None else _Discard())
        for i, (name, t, target) in enumerate(entries):
            dtype, shape = headers[i]
            if target is not None:
                encoded = alias.write(target)
            elif name in pre:
                encoded = no_larger_than_raw(pre[name], lambda t=t: tensor_to_storage(loaded(name, t))[1],
                                             storage_bytes(dtype, shape))
            else:
                if name not in done:
                    done[name] = encode_tensor(name, loaded(name, t), opts)
                encoded = done[name]
            writer.add_tensor(TensorRecord(name, dtype, shape, encoded.mode, encoded.params), encoded.streams)
            if progress and out is not None:
                progress(f"writing: {name}", i + 1, len(entries))
        return writer.finish({**meta, **extra})
    return write


class _Discard(io.RawIOBase):
    """A sink for a trial write, which needs only the file's size (a BytesIO held a whole copy of
    the file: 300 MB of a 600M-parameter model's encode at its peak)."""

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:  # type: ignore[override]
        return memoryview(b).nbytes


def _save_searching(tensors: Mapping[str, torch.Tensor], path: Union[PathLike, BinaryIO],
                    evaluate: Optional[Callable[[str], float]], threshold: Optional[float], higher_is_better: bool, *,
                    mode: Optional[str], lossless: bool, snr_db: Optional[float], granularity: Optional[str],
                    metadata: Optional[Mapping[str, Any]], overwrite: bool, progress: Progress, stats: Any,
                    bits: Optional[float], quality: Optional[float], files: Optional[Mapping[str, bytes]],
                    tq_scope: str, tolerance: Optional[float] = None) -> int:
    """``save(evaluate=..., threshold=...)``: :func:`tqcodec.pipeline.search.smallest_passing`
    over mode tq's rate, each trial a whole file judged by ``evaluate``."""
    if evaluate is None or not callable(evaluate):
        raise fail("BAD_OPTION", "threshold needs evaluate, a function of a candidate file's path giving its metric")
    if threshold is None or isinstance(threshold, bool) or not isinstance(threshold, (int, float)) \
            or not math.isfinite(threshold):
        raise fail("BAD_OPTION", f"evaluate needs a finite threshold, got {threshold!r}")
    if tolerance is None:
        tolerance = search.SIZE_TOLERANCE
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not 0.001 <= tolerance <= 1:
        raise fail("BAD_OPTION", f"the search tolerance must be a fraction from 0.001 to 1, got {tolerance!r}")
    for given, what in ((bits is not None, "bits"), (quality is not None, "quality"), (lossless, "lossless"),
                        (mode not in (None, "tq"), f"mode {mode!r}"), (tq_scope != "model", "tq_scope 'tensor'"),
                        (snr_db is not None, "snr_db"), (granularity is not None, "granularity")):
        if given:
            raise fail("BAD_OPTION", f"evaluate chooses the rate of a tq file: it cannot be combined with {what}")
    opts = EncodeOptions("tq", False, None, None, stats, None, None, "model")
    _check_stats_names(stats, tensors)
    target = search.Target(float(threshold), bool(higher_is_better))
    items = _checked_items(tensors)
    entries = plan_entries(items)
    meta = _file_metadata(metadata, files)
    if isinstance(path, (str, os.PathLike)) and not overwrite and os.path.exists(path):
        raise fail("OUTPUT_EXISTS", "output exists (use --force to overwrite)", path)  # before the search
    write = _file_writer(entries, opts, meta, None)

    encoder = tq_encoder(items, opts, lambda enc: write(None, enc), progress=progress)
    with tempfile.TemporaryDirectory(prefix="tqz-search-") as tmp:
        candidate = os.path.join(tmp, "candidate.tqz")

        def trial(b: float) -> tuple[dict, int, float]:
            pre = encoder.encode(bits=b)
            with atomic_output(candidate, True) as f:
                size = write(f, pre)
            return pre, size, _metric_of(evaluate, candidate)

        def report(t: search.Trial, n: int) -> None:
            if progress:
                progress(f"search: trial {n}: {t.bits:.3f} bits/param, {t.size} bytes, metric {t.metric:.6g} "
                         f"({'passes' if t.passed else 'fails'} {target.describe()})", n, 0)

        found = search.smallest_passing(trial, target, tolerance=float(tolerance), progress=report)
    log = {"threshold": target.threshold, "higher_is_better": target.higher_is_better,
           "trials": [t.as_dict() for t in found.trials], "chosen": found.trials.index(found.best)}
    return _write_to(path, overwrite, lambda out: write(out, found.result, {"tqz.search": log}))


def _metric_of(evaluate: Callable[[str], float], candidate: str) -> float:
    """``evaluate(candidate)`` as a float; anything else (an exception included) EVALUATE_FAILED."""
    try:
        value = evaluate(candidate)
    except TqzError:
        raise
    except Exception as exc:  # the user's evaluation: whatever it raises is reported, as one line
        raise fail("EVALUATE_FAILED", f"evaluate raised {type(exc).__name__}: {exc}") from exc
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        raise fail("EVALUATE_FAILED", f"evaluate gave {value!r}, not a finite number")
    return float(value)


def _write_to(path: Union[PathLike, BinaryIO], overwrite: bool, write: Callable[[BinaryIO], int]) -> int:
    """``write(out)`` into a file at ``path`` (atomically) or into a binary file object."""
    if isinstance(path, (str, os.PathLike)):
        with atomic_output(path, overwrite) as f:
            return write(f)
    return write(path)


def encode_bytes(tensors: Mapping[str, torch.Tensor], **options: Any) -> bytes:
    """``save`` into memory; returns the file's bytes."""
    buf = io.BytesIO()
    save(tensors, buf, **options)
    return buf.getvalue()


# --- Hugging Face folders -------------------------------------------------------------------------

def encode_folder(folder: PathLike, out: Any, **options: Any) -> int:
    """``save`` of a Hugging Face folder: tensors streamed, small files carried."""
    tensors, files = hf.read_folder(folder)
    return save(tensors, out, files=files, **options)


def decode_folder(source: PathLike, out: PathLike, *, shard_size: int = hf.DEFAULT_SHARD_SIZE,
                  overwrite: bool = False, jobs: int = 1, limits: Limits = DEFAULT_LIMITS,
                  progress: Progress = None) -> list[str]:
    """Decode the .tqz file ``source`` (a path or URL) into a Hugging Face folder ``out``: shards
    of at most ``shard_size`` bytes, their index, and the files carried in ``tqz.files``."""
    jobs = parallel.check_jobs(jobs)
    with open(source, limits=limits) as f:
        records = [(n, f.info(n).dtype, tuple(f.info(n).shape)) for n in f.keys()]
        # BAD_INPUT (spec §5.2.1): the file is valid, the folder cannot be made
        files = hf.check_files(f.metadata.get(hf.FILES_KEY, {}))
    local = isinstance(source, (str, os.PathLike)) and not remote.is_url(os.fspath(source))
    # a local file: random access, large tq tensors in row blocks (bounded memory); a URL: streamed
    tensors = parallel.iter_pieces(source, jobs, limits) if local else parallel.iter_decoded(source, jobs, limits)
    return hf.write_folder(out, records, tensors, files, shard_size, overwrite, progress)
