"""Where a ``.tqz`` file is read from: a path, bytes, a binary file object or a URL, opened in
one place for the two ways of reading (spec §10.1 front to back, §10.2 random access)."""
from __future__ import annotations

import builtins
import contextlib
import io
import os
from typing import BinaryIO, Callable, Iterator, Optional, Union

import torch

from ..errors import TqzError, fail
from ..format.header import HEADER_SIZE, parse_header
from ..format.reader import RandomAccessReader, file_reader, iter_chunks_front_to_back
from ..limits import DEFAULT_LIMITS, Limits
from ..pipeline.decode import Layout, decode_tensor, tensor_parts
from . import remote

PathLike = Union[str, os.PathLike]
Source = Union[PathLike, BinaryIO, bytes, bytearray, memoryview]


def path_of(source: object) -> Optional[str]:
    """The path or URL a source names (None for bytes and file objects)."""
    return os.fspath(source) if isinstance(source, (str, os.PathLike)) else None


@contextlib.contextmanager
def naming(path: Optional[PathLike]) -> Iterator[None]:
    """Attach ``path`` to every TqzError; turn OS errors into IO_ERROR."""
    try:
        yield
    except TqzError as exc:
        raise (exc.with_path(path) if path is not None else exc) from None
    except OSError as exc:
        raise fail("IO_ERROR", f"cannot read: {exc.strerror or exc}", path, exc.errno) from None


@contextlib.contextmanager
def open_stream(source: Source) -> Iterator[BinaryIO]:
    """A readable binary stream over ``source``: bytes, a path, a URL (one request, read as it
    arrives) or a file object (used as it is, not closed)."""
    path = path_of(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        yield io.BytesIO(bytes(source))
    elif path is not None and remote.is_url(path):
        with remote.open_stream(path) as f:
            yield f
    elif path is not None:
        with builtins.open(path, "rb") as f:
            yield f
    else:
        yield source  # type: ignore[misc]


class CountingReader(io.RawIOBase):
    """A readable stream that counts the bytes read through it (``count``)."""

    def __init__(self, stream: BinaryIO):
        self.stream = stream
        self.count = 0

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:  # type: ignore[override]
        data = self.stream.read(len(b))
        b[:len(data)] = data
        self.count += len(data)
        return len(data)


class RandomAccess:
    """A ``.tqz`` file opened for random access (spec §10.2): ``reader`` (the container's
    :class:`~tqcodec.format.reader.RandomAccessReader`), ``layout`` (each record's parsed
    parameters), ``remote`` (a URL's requests and bytes), ``close()``.

    A file without a valid footer may be truncated or extended: then the file is read front to
    back (§10.1) so that the error names what is wrong (for a URL only when the first request
    read it all, so the requests stay bounded)."""

    def __init__(self, source: Union[PathLike, bytes, bytearray], limits: Limits = DEFAULT_LIMITS):
        self.path = path_of(source)
        self._file: Optional[BinaryIO] = None
        self.remote: Optional[remote.RangeSource] = None
        self.layout = Layout(limits)
        with naming(self.path):
            if self.path is None:
                data = bytes(source)  # type: ignore[arg-type]
                read_at: Callable[[int, int], bytes] = lambda off, n: data[off:off + n]  # noqa: E731
                size = len(data)
            elif remote.is_url(self.path):
                self.remote = remote.open_range(self.path)
                size, read_at = self.remote.size, self.remote.read_at
            else:
                self._file = builtins.open(self.path, "rb")
                size = os.fstat(self._file.fileno()).st_size
                read_at = file_reader(self._file)
            try:
                self.reader = RandomAccessReader(read_at, size, self.layout,
                                                 max_manifest_length=limits.max_manifest_bytes)
            except TqzError as exc:
                if exc.code in ("BAD_INDEX", "TRUNCATED", "CHECKSUM_MISMATCH"):
                    if self.remote is None or self.remote.fully_cached:
                        _read_front_to_back(read_at, size, limits)
                    else:
                        parse_header(read_at(0, HEADER_SIZE))  # one more request: a file that is no .tqz
                self.close()
                raise

    @property
    def records(self):
        return self.reader.manifest.tensors

    def target(self, index: int) -> int:
        """The index holding tensor ``index``'s data (an alias's target, else ``index``)."""
        record = self.records[index]
        return self.layout.params[index].of if record.mode == "alias" else index

    def tensor(self, index: int) -> torch.Tensor:
        """Decode tensor ``index`` (an alias: its target), reading only its span."""
        i = self.target(index)
        with naming(self.path):
            return decode_tensor(self.reader.tensor_chunks(i), self.layout.params[i])

    def parts(self, index: int) -> dict:
        """Tensor ``index``'s integer stage (its mode's ``parts``; an alias: its target's)."""
        i = self.target(index)
        with naming(self.path):
            return tensor_parts(self.reader.tensor_chunks(i), self.layout.params[i])

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self.remote is not None:
            self.remote.close()


def _read_front_to_back(read_at: Callable[[int, int], bytes], size: int, limits: Limits) -> None:
    """Spec §10.1 over a random-access source: raises what the front-to-back order finds."""
    class _Seq(io.RawIOBase):
        pos = 0

        def readable(self) -> bool:
            return True

        def readinto(self, b) -> int:  # type: ignore[override]
            data = read_at(self.pos, min(len(b), size - self.pos))
            b[:len(data)] = data
            self.pos += len(data)
            return len(data)

    for _ in iter_chunks_front_to_back(io.BufferedReader(_Seq(), 1 << 20), Layout(limits),
                                       max_manifest_length=limits.max_manifest_bytes):
        pass


def iter_tensors(source: Source, limits: Limits = DEFAULT_LIMITS) -> Iterator[tuple[str, "torch.Tensor"]]:
    """Spec §10.1: decode front to back, yielding ``(name, tensor)`` as each completes. Holds
    the tensor being decoded and its chunks, and the tensors an alias refers to."""
    path = path_of(source)
    with naming(path), open_stream(source) as f:
        layout = Layout(limits)
        done: dict[int, torch.Tensor] = {}
        targets: set = set()  # indices some alias refers to (a set: one pass, not one per tensor)
        for tc in iter_chunks_front_to_back(f, layout, on_manifest=lambda h, m: targets.update(
                layout.params[i].of for i, r in enumerate(m.tensors) if r.mode == "alias"),
                max_manifest_length=limits.max_manifest_bytes):
            if tc.record.mode == "alias":
                tensor = done[layout.params[tc.index].of]
            else:
                tensor = decode_tensor(tc, layout.params_of(tc))
            if tc.index in targets:
                done[tc.index] = tensor
            yield tc.record.name, tensor
            del tc, tensor  # hold no finished tensor (or its chunks) while the next one arrives
