"""The Python API: save, load, open, iter_tensors, verify (and Hugging Face folders in and out).

A thin layer: encoding is ``tqcodec.pipeline``, files and sources ``tqcodec.io``, pools
``tqcodec.parallel``, the container ``tqcodec.format``.
"""
from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass
from typing import Any, BinaryIO, Callable, Iterator, Mapping, Optional, Union

import torch

from . import __version__ as _version
from . import parallel
from .errors import fail
from .format.manifest import TensorRecord, pack_canonical
from .format.writer import ContainerWriter
from .io import hf, remote, sources
from .io.files import atomic_output
from .limits import DEFAULT_LIMITS, Limits
from .modes import alias
from .modes.base import Encoded
from .pipeline.classic import CLASSIC_MODES
from .pipeline.encode import EncodeOptions, encode_classic_file, encode_tensor, encode_tq, no_larger_than_raw
from .pipeline.tensors import check_tensor, name_of_torch, plan_entries, tensor_to_storage

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

    ``jobs``: processes decoding range-coded chunks (None or 0: every CPU this process may use;
    1: this thread only). The tensors, their order and every error are the same for every
    ``jobs``; with ``jobs`` > 1 a file object is read ahead of the tensors yielded.
    """
    return sources.iter_tensors(source, limits, parallel.check_jobs(jobs))


def load(path: Union[PathLike, BinaryIO, bytes], *, limits: Limits = DEFAULT_LIMITS,
         jobs: Optional[int] = None) -> dict[str, torch.Tensor]:
    """Decode a whole .tqz file into ``{name: tensor}`` in file order (tied tensors shared).

    ``jobs``: processes decoding range-coded chunks (None or 0: every CPU this process may use;
    1: this thread only), for any source; the tensors are the same for every ``jobs``
    (``tqcodec.parallel.iter_decoded``)."""
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
         tq_scope: str = "model", executor: Any = None) -> int:
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
    """
    opts = EncodeOptions(mode, lossless, snr_db, granularity, stats, bits, quality, tq_scope)
    meta = {"tqz.encoder": f"tqcodec {_version}"}
    if metadata:
        for k in metadata:
            if not isinstance(k, str) or k.startswith("tqz."):
                raise fail("BAD_OPTION", f"metadata key {k!r} must be a string not starting with 'tqz.'")
        meta.update(metadata)
    if files:
        meta[hf.FILES_KEY] = hf.check_files(files, "BAD_OPTION")
    pack_canonical(meta)  # raises BAD_OPTION for values the manifest cannot hold
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
    items = list(tensors.items())
    for name, t in items:
        check_tensor(name, t)  # BAD_INPUT: bad name, not a plain dense tensor, dtype not in spec §5.5
    entries = plan_entries(items)
    done: dict[str, Encoded] = {}  # results without tq, kept across tq's trial writes

    def write(out: Optional[BinaryIO], pre: Mapping[str, Encoded]) -> int:
        """The file with the tensors of ``pre`` as they are and the rest encoded here, into
        ``out`` (None: a trial, only its size)."""
        writer = ContainerWriter(out if out is not None else io.BytesIO())
        for i, (name, t, target) in enumerate(entries):
            dtype = name_of_torch(t.dtype)
            if target is not None:
                encoded = alias.write(target)
            elif name in pre:  # never more bytes than the tensor stored exactly
                encoded = no_larger_than_raw(pre[name], tensor_to_storage(t)[1])
            else:
                if name not in done:
                    done[name] = encode_tensor(name, t, opts)
                encoded = done[name]
            writer.add_tensor(TensorRecord(name, dtype, tuple(t.shape), encoded.mode, encoded.params), encoded.streams)
            if progress and out is not None:
                progress(f"writing: {name}", i + 1, len(entries))
        return writer.finish(meta)

    if opts.uses_tq:
        pre = encode_tq(items, opts, lambda enc: write(None, enc), progress=progress)
    elif opts.mode in CLASSIC_MODES and opts.bits is not None:  # the whole file on its bits target
        pre = encode_classic_file(items, opts, lambda enc: write(None, enc), progress=progress)
    else:
        pre = {}
    return _write_to(path, overwrite, lambda out: write(out, pre))


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
