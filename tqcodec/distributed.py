"""Encoding on a Dask cluster (``pip install 'tqcodec[distributed]'``).

Two granularities, both giving the same bytes as a local run (every task runs the same
deterministic encoder as ``tqcodec.api.save``; the container of one model is assembled in one
place, in input order):

- ``encode_many(client, jobs)``: a directory of models, one task per model (each task reads its
  model and writes its ``.tqz`` on the worker; paths must be visible to the workers, e.g. a shared
  file system).
- ``save(tensors, path, client)``: the tensors of one huge model as tasks (workers load their
  tensor themselves from the shared safetensors shards, ``tqcodec.hf.LazyTensors``); the results
  come back in order, at most ``window`` in flight, and this process writes the file.

Why Dask and not Ray: a pure-Python wheel (distributed) that starts a local cluster in a second
and runs on any machine with the same Python, exposes a ``concurrent.futures`` executor that
drops into the same ordered pipeline as the local process pool, and is what many data platforms
already run; Ray brings a large binary runtime for features (actors, object store) this job
does not need.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Union

from . import api
from .errors import fail
from .io.files import read_model
from .io.hf import is_hf_folder

PathLike = Union[str, os.PathLike]


def _client(client: Any) -> Any:
    if client is None:
        try:
            from distributed import get_client
        except ImportError:
            raise fail("BAD_OPTION", "Dask is not installed: pip install 'tqcodec[distributed]'") from None
        return get_client()
    return client


def encode_one(source: str, out: str, options: Mapping[str, Any]) -> int:
    """Task body: encode the model file or Hugging Face folder ``source`` into ``out``."""
    if Path(source).is_dir():
        return api.encode_folder(source, out, **options)
    return api.save(read_model(source), out, **options)


def encode_many(jobs: Iterable[tuple[PathLike, PathLike]], client: Any = None, **options: Any) -> list[int]:
    """Encode each (source, output) pair as one task on the cluster; returns the sizes in order.
    ``options``: those of ``tqcodec.api.save`` (``jobs`` stays 1 inside a task unless given)."""
    client = _client(client)
    futures = [client.submit(encode_one, os.fspath(src), os.fspath(out), dict(options), pure=False)
               for src, out in jobs]
    return client.gather(futures)


def save(tensors: Mapping[str, Any], path: Any, client: Any = None, **options: Any) -> int:
    """``tqcodec.api.save`` with each tensor's encode a task on the cluster (same bytes)."""
    client = _client(client)
    return api.save(tensors, path, executor=client.get_executor(pure=False), **options)


def encode_directory(directory: PathLike, out_dir: Optional[PathLike] = None, client: Any = None,
                     **options: Any) -> dict[str, int]:
    """Every model of ``directory`` (``.safetensors``/``.pt`` files and Hugging Face folders) into
    ``out_dir`` (default: next to each) as ``<name>.tqz``; returns {output path: bytes}."""
    directory = Path(directory)
    out_dir = Path(out_dir) if out_dir is not None else directory
    pairs = []
    for p in sorted(directory.iterdir()):
        if p.name.startswith("."):
            continue
        if is_hf_folder(p) or (p.is_file() and p.suffix.lower() in (".safetensors", ".pt", ".pth", ".bin")):
            pairs.append((p, out_dir / ((p.name if p.is_dir() else p.stem) + ".tqz")))
    if not pairs:
        raise fail("BAD_INPUT", "no model files or Hugging Face folders", directory)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise fail("IO_ERROR", f"cannot create the output folder: {exc.strerror or exc}", out_dir) from None
    sizes = encode_many(pairs, client, **options)
    return {str(o): n for (_, o), n in zip(pairs, sizes)}
