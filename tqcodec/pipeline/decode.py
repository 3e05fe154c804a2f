"""Decoding one tensor: a record's streams through its mode (spec §7) into a torch tensor, and
the stream layout the container reader asks of the modes (spec §10.1 step 2), each record's
parameters parsed once."""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from ..errors import fail
from ..format.chunks import StreamSpec
from ..format.manifest import TensorRecord
from ..format.reader import TensorChunks
from ..limits import DEFAULT_LIMITS, Limits
from ..modes import decode, mode_of
from ..modes.streams import Predecoded
from .tensors import storage_to_tensor


class Layout:
    """The ``StreamLayout`` of the container reader: checks a record against this reader's
    resource limits (spec §12), parses its mode's parameters (kept, so decoding parses them
    once) and gives its streams (item counts and payload kinds)."""

    def __init__(self, limits: Limits = DEFAULT_LIMITS):
        self.limits = limits
        self.params: dict[int, Any] = {}
        self.modes: dict[int, Any] = {}
        self.items: dict[int, tuple[StreamSpec, ...]] = {}

    def __call__(self, index: int, record: TensorRecord, records: Sequence[TensorRecord]) -> tuple[StreamSpec, ...]:
        # spec §12.1: this reader's own limit (default: Level 2's 2^36 bytes per tensor). Every shape
        # numpy and torch can hold: the manifest's element limit counts a 0 dimension as 1 (§5.3), so
        # the dimensions multiply to at most 2^36 x 8 bytes, even for an empty tensor
        if record.numel * record.itemsize > self.limits.max_tensor_bytes:
            raise fail("LIMIT_EXCEEDED", f"tensor {record.name!r} would decode to "
                                         f"{record.numel * record.itemsize} bytes (this reader's limit is "
                                         f"{self.limits.max_tensor_bytes})")
        mode = mode_of(record)
        params = mode.parse(record)
        items = mode.stream_items(params, index, records)
        self.params[index] = params
        self.modes[index] = mode
        self.items[index] = items
        return items

    def params_of(self, tc: TensorChunks) -> Any:
        """The parsed parameters of a tensor this layout has seen."""
        return self.params[tc.index]


class Prefetch:
    """Hands the range decoding of tensors' chunks to ``submit(payload, table, count)``
    (``tqcodec.coding.workers.Pool.submit``: worker threads) as the chunks are read, before
    their tensor is complete: :meth:`chunk` is the container reader's ``on_chunk``.

    :meth:`tensor` then gives the tensor with each range-coded stream as a ``Predecoded`` list
    (the same chunks, and the task of each chunk of at least ``min_items`` symbols). Decoding it
    with :func:`decode_tensor` runs the mode's decoder unchanged, so the checks come in the same
    order and the values are the same; only the range decoding (with §8.5's check) happened
    elsewhere. Each record's parameters are the layout's (parsed once, not again here)."""

    def __init__(self, layout: "Layout", submit: Callable[[bytes, np.ndarray, int], Any], min_items: int = 0):
        self.layout = layout
        self.submit = submit
        self.min_items = min_items
        self.tables: dict[int, tuple] = {}
        self.tasks: dict[tuple[int, int], list] = {}  # (tensor, stream) -> the task (or None) of each chunk

    def chunk(self, index: int, stream: int, items: int, payload: bytes) -> None:
        tables = self.tables.get(index)
        if tables is None:
            tables = self.layout.modes[index].symbol_tables(self.layout.params[index])
            self.tables = {index: tables}  # one tensor's at a time
        table = tables[stream] if stream < len(tables) else None
        if table is None:
            return
        task = None
        if items >= self.min_items and payload and len(payload) % 4 == 0:  # else: decoded (or refused) in place
            task = self.submit(payload, table, items)
        self.tasks.setdefault((index, stream), []).append(task)

    def tensor(self, tc: TensorChunks) -> tuple[TensorChunks, list]:
        """``tc`` with its range-coded streams' tasks attached, and those tasks."""
        streams = list(tc.streams)
        tasks = []
        for s, chunks in enumerate(streams):
            pending = self.tasks.pop((tc.index, s), None)
            if pending is None:
                continue
            wrapped = Predecoded(chunks)
            wrapped.tasks = pending
            streams[s] = wrapped
            tasks += [t for t in pending if t is not None]
        return TensorChunks(tc.index, tc.record, streams), tasks

    def pending(self) -> list:
        """Tasks of chunks whose tensor has not been handed out (to cancel)."""
        return [t for ts in self.tasks.values() for t in ts if t is not None]


def decode_array(tc: TensorChunks, params: Optional[Any] = None):
    """The storage array of a (non-alias) tensor from its chunks (``params``: its mode's parsed
    parameters, parsed here if not given). A memory error is this reader's resource limit."""
    try:
        return decode(tc.record, tc.streams, params)
    except MemoryError:  # spec §12: a resource limit of this reader, not a fault of the file
        raise fail("LIMIT_EXCEEDED", f"tensor {tc.record.name!r}: out of memory while decoding") from None


def decode_tensor(tc: TensorChunks, params: Optional[Any] = None) -> torch.Tensor:
    """A (non-alias) tensor from its chunks, as a torch tensor of its dtype."""
    return storage_to_tensor(tc.record.dtype, decode_array(tc, params))


def tensor_parts(tc: TensorChunks, params: Optional[Any] = None) -> dict:
    """The integer stage of a (non-alias) tensor (its mode's ``parts``)."""
    mode = mode_of(tc.record)
    p = mode.parse(tc.record) if params is None else params
    try:
        return mode.parts(p, tc.record, tc.streams)
    except MemoryError:
        raise fail("LIMIT_EXCEEDED", f"tensor {tc.record.name!r}: out of memory while decoding") from None
