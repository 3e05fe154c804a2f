"""Where a ``.tqz`` file is read from: a path, bytes, a binary file object or a URL, opened in
one place for the two ways of reading (spec §10.1 front to back, §10.2 random access)."""
from __future__ import annotations

import builtins
import collections
import contextlib
import io
import os
import threading
from typing import BinaryIO, Callable, Iterator, Optional, Sequence, Union

import torch

from ..coding import workers
from ..errors import TqzError, fail
from ..format.header import HEADER_SIZE, parse_header
from ..format.reader import RandomAccessReader, file_reader, iter_chunks_front_to_back
from ..limits import DEFAULT_LIMITS, Limits
from ..pipeline.decode import Layout, Prefetch, decode_tensor, tensor_parts
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


def iter_tensors(source: Source, limits: Limits = DEFAULT_LIMITS, jobs: int = 1,
                 ) -> Iterator[tuple[str, "torch.Tensor"]]:
    """Spec §10.1: decode front to back, yielding ``(name, tensor)`` as each completes.

    ``jobs`` <= 1: in this thread; holds the tensor being decoded and its chunks, and the
    tensors an alias refers to. ``jobs`` > 1: the source is read ahead by a thread (at most
    READ_AHEAD_BYTES of chunks beyond the tensor being decoded, plus one tensor) and the
    range-coded chunks are decoded by ``jobs`` worker threads as they arrive
    (:mod:`tqcodec.coding.workers`); the tensors, their order and every error are the same."""
    if jobs > 1:
        yield from _iter_parallel(source, limits, jobs)
        return
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


READ_AHEAD_BYTES = 64 << 20  # parallel decode: chunks and worker results held beyond the tensor asked for
SMALL_TENSOR_BYTES = 1 << 20  # a tensor this small (decoded) is read ahead whatever it holds
TASKS_PER_JOB = 4  # read ahead while fewer than this many chunks per worker wait to be decoded
MIN_TASK_SYMBOLS = 1 << 14  # a smaller range-coded chunk is decoded by its asker (a hand-over would cost more)


class _Stopped(Exception):
    """The consumer has gone: the read-ahead thread stops at its next read."""


class _ReadAhead:
    """Spec §10.1 front to back in a thread: each range-coded chunk, once read and CRC-checked,
    is handed to the worker threads; each tensor, once complete, is queued for the consumer;
    an error is queued where it was found, after the tensors read before it.

    The next tensor is read when the consumer asks for it, or ahead of that to give the workers
    something to do: when it has range-coded chunks for them and fewer than TASKS_PER_JOB chunks
    per worker wait to be decoded, or when it is small. Ahead of the consumer, at most
    READ_AHEAD_BYTES of chunks and decoded symbols are held. So a file without range-coded
    chunks is read as the serial decoder reads it, one tensor at a time."""

    def __init__(self, source: Source, limits: Limits, jobs: int):
        self.source, self.limits, self.jobs = source, limits, jobs
        self.layout = Layout(limits)
        self.records: Sequence = ()
        self.targets: set = set()
        self.cv = threading.Condition()
        self.items: collections.deque = collections.deque()
        self.held = 0  # bytes of chunks and symbols of the tensors queued or being decoded
        self.asked = False  # the consumer waits for a tensor
        self.stopped = False
        self.pool: Optional[workers.Pool] = None
        self.undecoded: collections.deque = collections.deque()  # tasks submitted, maybe not done
        self.thread = threading.Thread(target=self._run, name="tqcodec-read-ahead", daemon=True)
        self.thread.start()

    def read(self, n: int) -> bytes:  # the stream as iter_chunks_front_to_back sees it
        if self.stopped:
            raise _Stopped
        return self._f.read(n)

    def _submit(self, payload: bytes, table, count: int) -> workers.Task:
        if self.pool is None:
            self.pool = workers.pool(self.jobs)
        task = self.pool.submit(payload, table, count)
        self.undecoded.append(task)
        return task

    def _run(self) -> None:
        layout = self.layout

        def on_manifest(header, manifest) -> None:
            self.records = manifest.tensors
            self.targets.update(layout.params[i].of for i, r in enumerate(manifest.tensors) if r.mode == "alias")
            if any(self._for_workers(j) for j in range(len(manifest.tensors))):
                self.pool = workers.pool(self.jobs)  # start them now: they are ready sooner

        ahead = Prefetch(layout, self._submit, MIN_TASK_SYMBOLS)
        try:
            with open_stream(self.source) as f:
                self._f = f
                for tc in iter_chunks_front_to_back(self, layout, on_manifest=on_manifest,
                                                    max_manifest_length=self.limits.max_manifest_bytes,
                                                    on_chunk=ahead.chunk):
                    tc, tasks = ahead.tensor(tc)
                    size = sum(len(p) for chunks in tc.streams for _, p in chunks) + sum(t.count for t in tasks)
                    if not self._put((tc, tasks, size), size) or not self._gate(tc.index + 1):
                        return
            self._put(None, 0)
        except _Stopped:
            pass
        except BaseException as exc:  # handed to the consumer, raised there in file order
            self._put(exc, 0)
        finally:
            self._f = None
            if self.pool is not None:
                self.pool.cancel(ahead.pending())  # chunks of a tensor that was never completed

    def _for_workers(self, j: int) -> bool:
        """Whether tensor ``j`` has a range-coded stream the workers would decode."""
        tables = self.layout.modes[j].symbol_tables(self.layout.params[j])
        return any(t is not None and spec.items >= MIN_TASK_SYMBOLS for t, spec in zip(tables, self.layout.items[j]))

    def _worth_reading(self, j: int) -> bool:
        """Whether tensor ``j`` may be read before the consumer asks for it (under ``cv``)."""
        if self.held >= READ_AHEAD_BYTES:
            return False
        if j >= len(self.records):
            return True  # the index and footer
        record = self.records[j]
        if record.numel * record.itemsize <= SMALL_TENSOR_BYTES:
            return True
        if not self._for_workers(j):
            return False  # nothing for the workers: read it when it is asked for
        while self.undecoded and not self.undecoded[0].waiting:
            self.undecoded.popleft()
        return sum(t.waiting for t in self.undecoded) < TASKS_PER_JOB * self.jobs

    def _gate(self, j: int) -> bool:
        """Wait until tensor ``j`` may be read; False when the consumer has gone."""
        with self.cv:
            while not self.stopped and not self.asked and not self._worth_reading(j):
                self.cv.wait(0.05)  # tasks finishing do not notify: look again soon
            return not self.stopped

    def _put(self, item, size: int) -> bool:
        with self.cv:
            if self.stopped:
                if isinstance(item, tuple) and self.pool is not None:
                    self.pool.cancel(item[1])
                return False
            self.items.append(item)
            self.held += size
            self.asked = False  # answered: the next tensor waits for the next question (or _gate)
            self.cv.notify_all()
            return True

    def get(self):
        with self.cv:
            while not self.items:
                self.asked = True
                self.cv.notify_all()
                self.cv.wait()
            self.asked = False
            return self.items.popleft()

    def release(self, size: int) -> None:
        with self.cv:
            self.held -= size
            self.cv.notify_all()

    def close(self, current: Sequence = (), wait: float = 10.0) -> None:
        """Stop reading; drop the range decoding no one will ask for (``current``: the tasks of
        the tensor being decoded, if any). Waits up to ``wait`` seconds for the reading thread
        (a daemon: one blocked on a stalled pipe or URL ends with its read)."""
        with self.cv:
            self.stopped = True
            self.cv.notify_all()
            left = [t for item in self.items if isinstance(item, tuple) for t in item[1]]
            self.items.clear()
        if self.pool is not None:
            self.pool.cancel(list(current) + left)
        self.thread.join(timeout=wait)  # at most one read of the source in progress


def _iter_parallel(source: Source, limits: Limits, jobs: int) -> Iterator[tuple[str, "torch.Tensor"]]:
    path = path_of(source)
    with naming(path):
        ahead = _ReadAhead(source, limits, jobs)
        tasks: Sequence = ()
        wait = 10.0
        try:
            done: dict[int, torch.Tensor] = {}
            while True:
                item = ahead.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                tc, tasks, size = item
                if tc.record.mode == "alias":
                    tensor = done[ahead.layout.params[tc.index].of]
                else:
                    tensor = decode_tensor(tc, ahead.layout.params_of(tc))
                if tc.index in ahead.targets:
                    done[tc.index] = tensor
                ahead.release(size)
                tasks = ()
                yield tc.record.name, tensor
                del tc, tensor, item
        except KeyboardInterrupt:  # Ctrl-C: the workers' decoding is not wanted any more
            workers.abort()
            wait = 0.5  # nor a read of a stalled source
            raise
        finally:
            ahead.close(tasks, wait)
