"""tqcodec.format.writer (ContainerWriter): chunks past its memory cap are spooled to a temporary file."""
from __future__ import annotations

import os

import torch

from tqcodec.format.manifest import TensorRecord
from tqcodec.format.writer import ContainerWriter
from tqcodec.modes import raw


def test_container_writer_spools_to_disk_past_its_memory_cap():
    import io
    w = ContainerWriter(io.BytesIO())
    _, params, streams = raw.write(torch.zeros(1).numpy(), "none")
    chunk = [(1 << 22, os.urandom(1 << 22))]
    for i in range(17):  # 68 MiB of chunks: over the 64 MiB kept in memory
        w.add_tensor(TensorRecord(f"t{i}", "uint8", (1 << 22,), "raw", {"codec": "none"}), [chunk])
    assert w._spool._rolled  # a real temporary file now, not memory
    w.close()
