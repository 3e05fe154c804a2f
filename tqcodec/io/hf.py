"""Hugging Face model folders in and out.

In: ``config.json`` + ``model.safetensors``, or sharded ``model-0000X-of-0000Y.safetensors`` with
``model.safetensors.index.json``. Tensors are read lazily (:class:`LazyTensors`: one tensor at a
time through safetensors' ``safe_open``); the folder's small non-weight files (config, tokenizer,
generation config, ...) travel inside the ``.tqz`` in metadata ``tqz.files`` (spec §5.2.1), so
one file is the whole model.

Out: a folder that ``transformers`` and ``safetensors`` load: shards of at most ``shard_size``
bytes (one shard: ``model.safetensors``; more: ``model-0000X-of-0000Y.safetensors`` plus
``model.safetensors.index.json``) and the carried files. Shards are written tensor by tensor
(the safetensors header is computed from the manifest first), so memory stays at the tensors in
flight. The folder is built under a temporary name and renamed into place when complete.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
import tempfile
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Union

import torch
from safetensors import safe_open

from ..errors import TqzError, fail
from ..format.dtypes import DTYPES
from ..pipeline.tensors import tensor_to_storage

PathLike = Union[str, os.PathLike]

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
FILES_KEY = "tqz.files"
# files carried by default: these suffixes, each at most MAX_FILE_BYTES, together at most
# MAX_FILES_BYTES (the manifest holds at most 64 MiB, spec §12)
CARRY_SUFFIXES = (".json", ".txt", ".model", ".tiktoken", ".jinja", ".md", ".vocab", ".spm")
MAX_FILE_BYTES = 32 << 20
MAX_FILES_BYTES = 48 << 20
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".gguf")
DEFAULT_SHARD_SIZE = 5 * 10**9  # as transformers' save_pretrained ("5GB")

# --- carried files ------------------------------------------------------------------------------

def check_file_name(name: Any, code: str = "BAD_INPUT") -> str:
    """A carried file's name (from a file: untrusted) must be a plain file name: a non-empty
    string without ``/``, ``\\``, control characters, not ``.``/``..``, not starting with ``.``
    and not one of the weight files the folder writer makes. Else TqzError ``code``."""
    if not isinstance(name, str) or not name:
        raise fail(code, f"carried file name {name!r} is not a non-empty string")
    bad = ("/" in name or "\\" in name or name.startswith(".") or len(name.encode("utf-8", "replace")) > 255
           or any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 for c in name) or ":" in name)
    if bad:
        raise fail(code, f"carried file name {name!r} is not a plain file name")
    if name == INDEX_NAME or name.endswith(WEIGHT_SUFFIXES):
        raise fail(code, f"carried file name {name!r} is a weight file name")
    return name


def check_files(files: Mapping[str, Any], code: str = "BAD_INPUT") -> dict[str, bytes]:
    """Spec §5.2.1: a map of plain file names to binary values."""
    if not isinstance(files, Mapping):
        raise fail(code, f"metadata {FILES_KEY!r} is not a map")
    out = {}
    for name, data in files.items():
        check_file_name(name, code)
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise fail(code, f"carried file {name!r} is not binary")
        out[name] = bytes(data)
    return out


def carried_files(folder: PathLike, max_file_bytes: int = MAX_FILE_BYTES,
                  max_total_bytes: int = MAX_FILES_BYTES) -> dict[str, bytes]:
    """The folder's top-level non-weight files worth carrying (config, tokenizer, ...)."""
    folder = Path(folder)
    out: dict[str, bytes] = {}
    total = 0
    for p in sorted(folder.iterdir(), key=lambda p: p.name.encode("utf-8", "surrogatepass")):
        name = p.name
        if name.startswith(".") or not p.is_file() or name == INDEX_NAME or name.endswith(WEIGHT_SUFFIXES):
            continue
        if not name.lower().endswith(CARRY_SUFFIXES):
            continue
        try:
            check_file_name(name, "BAD_INPUT")
        except TqzError:
            warnings.warn(f"{p}: not carried (name)", stacklevel=2)
            continue
        size = p.stat().st_size
        if size > max_file_bytes or total + size > max_total_bytes:
            warnings.warn(f"{p}: not carried ({size} bytes: over the size cap)", stacklevel=2)
            continue
        out[name] = p.read_bytes()
        total += size
    return out


# --- reading a folder -------------------------------------------------------------------------------

_FROM_SAFETENSORS = {d.safetensors: d.name for d in DTYPES.values()}


@dataclass(frozen=True)
class TensorRef:
    """A tensor that is not loaded yet: key ``key`` of the safetensors file ``path``.

    Picklable, so a worker process loads it itself. Each load opens and closes the file, so no
    memory map outlives the tensor (resident mapped pages would count towards the peak RSS).
    """

    path: str
    key: str

    def load(self, rows: Optional[tuple[int, int]] = None) -> torch.Tensor:
        """The tensor, or only its rows ``rows[0]:rows[1]`` (read from the file alone)."""
        try:
            with safe_open(self.path, framework="pt") as f:
                t = f.get_tensor(self.key) if rows is None else f.get_slice(self.key)[rows[0]:rows[1]]
        except Exception as exc:  # safetensors raises its own SafetensorError / OSError
            raise fail("BAD_INPUT", f"cannot read tensor {self.key!r} ({exc})", self.path) from None
        return t

    def _slice_header(self) -> tuple[tuple[int, ...], str]:
        """(shape, safetensors dtype string) from the file's header, nothing loaded."""
        try:
            with safe_open(self.path, framework="pt") as f:
                sl = f.get_slice(self.key)
                return tuple(sl.get_shape()), sl.get_dtype()
        except Exception as exc:
            raise fail("BAD_INPUT", f"cannot read tensor {self.key!r} ({exc})", self.path) from None

    def header(self) -> tuple[str, tuple[int, ...]]:
        """(spec §5.5 dtype name, shape) from the file's header, nothing loaded; BAD_INPUT for a
        dtype the format lacks."""
        shape, dtype = self._slice_header()
        if dtype not in _FROM_SAFETENSORS:
            raise fail("BAD_INPUT", f"tensor {self.key!r} has dtype {dtype}, which cannot be stored", self.path)
        return _FROM_SAFETENSORS[dtype], shape

    def layout(self) -> tuple[tuple[int, ...], bool]:
        """(shape, is a float dtype) from the file's header, nothing loaded."""
        shape, dtype = self._slice_header()
        return shape, dtype in ("F64", "F32", "F16", "BF16")


class LazyTensors(Mapping):
    """name -> tensor, loaded only when asked (``refs()`` gives picklable :class:`TensorRef`s)."""

    def __init__(self, refs: Iterable[tuple[str, TensorRef]]):
        self._refs = dict(refs)

    def refs(self) -> list[tuple[str, TensorRef]]:
        return list(self._refs.items())

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._refs[name].load()

    def __iter__(self) -> Iterator[str]:
        return iter(self._refs)

    def __len__(self) -> int:
        return len(self._refs)

    def numel(self) -> int:
        """Parameters of every tensor, from the files' headers (nothing loaded)."""
        by_file: dict[str, list[str]] = {}
        for ref in self._refs.values():
            by_file.setdefault(ref.path, []).append(ref.key)
        n = 0
        for path, keys in by_file.items():
            with safe_open(path, framework="pt") as f:
                for k in keys:
                    size = 1
                    for d in f.get_slice(k).get_shape():
                        size *= d
                    n += size
        return n


def is_hf_folder(path: PathLike) -> bool:
    p = Path(path)
    return p.is_dir() and ((p / SINGLE_NAME).is_file() or (p / INDEX_NAME).is_file())


def read_folder(folder: PathLike) -> tuple[LazyTensors, dict[str, bytes]]:
    """(lazy tensors, carried files) of a Hugging Face folder. Tensor order: shard by shard
    (index order of the shard files), each shard in its own header order."""

    folder = Path(folder)
    if not folder.is_dir():
        raise fail("IO_ERROR", "not a folder", folder)
    index = folder / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text("utf-8"))["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError("weight_map is not an object")
        except (ValueError, KeyError, TypeError) as exc:
            raise fail("BAD_INPUT", f"not a valid safetensors index ({exc})", index) from None
        shards: list[str] = []
        for name in weight_map.values():
            if not isinstance(name, str) or "/" in name or "\\" in name or name in ("", ".", ".."):
                raise fail("BAD_INPUT", f"index names a shard that is not a file of the folder: {name!r}", index)
            if name not in shards:
                shards.append(name)
        shards.sort()
    elif (folder / SINGLE_NAME).is_file():
        weight_map, shards = None, [SINGLE_NAME]
    else:
        raise fail("BAD_INPUT", f"no {SINGLE_NAME} or {INDEX_NAME} in the folder", folder)
    refs: list[tuple[str, TensorRef]] = []
    seen: set[str] = set()
    for shard in shards:
        path = folder / shard
        try:
            with safe_open(str(path), framework="pt") as f:
                keys = list(f.keys())
        except Exception as exc:
            raise fail("BAD_INPUT", f"not a readable safetensors file ({exc})", path) from None
        for k in keys:
            if weight_map is not None and weight_map.get(k) != shard:
                continue  # the index is authoritative (a key in two shards: the index's shard)
            if k in seen:
                raise fail("BAD_INPUT", f"tensor {k!r} is in two shards", path)
            seen.add(k)
            refs.append((k, TensorRef(str(path), k)))
    if weight_map is not None:
        missing = [k for k in weight_map if k not in seen]
        if missing:
            raise fail("BAD_INPUT", f"index lists {len(missing)} tensors the shards lack (e.g. {missing[0]!r})",
                       index)
    return LazyTensors(refs), carried_files(folder)


# --- writing a folder -------------------------------------------------------------------------------

def plan_shards(records: list[tuple[str, str, tuple[int, ...]]], shard_size: int) -> list[list[int]]:
    """Tensors (name, dtype, shape) grouped in file order into shards of at most ``shard_size``
    bytes of data (a larger tensor gets a shard of its own), like transformers' sharding."""
    shards: list[list[int]] = [[]]
    size = 0
    for i, (_, dtype, shape) in enumerate(records):
        n = DTYPES[dtype].itemsize
        for d in shape:
            n *= d
        if shards[-1] and size + n > shard_size:
            shards.append([])
            size = 0
        shards[-1].append(i)
        size += n
    return shards


class _ShardWriter:
    """One safetensors file written tensor by tensor at offsets fixed by its header.

    Within the file, data is laid out by decreasing item size (then file order), as the
    safetensors serializer does, so every tensor's data is aligned to its item size."""

    def __init__(self, path: Path, members: list[tuple[str, str, tuple[int, ...]]]):
        order = sorted(range(len(members)), key=lambda j: (-DTYPES[members[j][1]].itemsize, j))
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        self.offsets: dict[str, tuple[int, int]] = {}
        pos = 0
        for j in order:
            name, dtype, shape = members[j]
            n = DTYPES[dtype].itemsize
            for d in shape:
                n *= d
            header[name] = {"dtype": DTYPES[dtype].safetensors, "shape": list(shape), "data_offsets": [pos, pos + n]}
            self.offsets[name] = (pos, n)
            pos += n
        raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        raw += b" " * (-len(raw) % 8)
        self.data_start = 8 + len(raw)
        self.total = pos
        self.f = open(path, "wb")
        self.f.write(struct.pack("<Q", len(raw)) + raw)
        self.f.truncate(self.data_start + pos)
        self.left = len(members)
        self.written = {name: 0 for name, _, _ in members}

    def write(self, name: str, t: torch.Tensor, start: int = 0) -> bool:
        """Write ``t`` as the tensor ``name`` (or its rows from ``start`` on); True when the
        tensor is complete."""
        off, n = self.offsets[name]
        _, arr = tensor_to_storage(t)
        row = arr.nbytes // t.shape[0] if t.dim() and t.shape[0] else 0
        at = start * row
        if at != self.written[name] or at + arr.nbytes > n:
            raise fail("BAD_PAYLOAD", f"tensor {name!r}: decoded piece does not fit its {n} bytes")
        self.f.seek(self.data_start + off + at)
        if arr.size:
            self.f.write(memoryview(arr.reshape(-1)).cast("B"))
        self.written[name] = at + arr.nbytes
        if self.written[name] < n:
            return False
        self.left -= 1
        return True

    def close(self) -> None:
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()


def shard_names(count: int) -> list[str]:
    if count == 1:
        return [SINGLE_NAME]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


@contextlib.contextmanager
def atomic_folder(path: PathLike, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary folder that becomes ``path`` when the block completes (rename). With
    ``overwrite``, a previous ``path`` folder is replaced; without it, an existing non-empty
    ``path`` is OUTPUT_EXISTS. On any error the temporary folder is removed."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise fail("OUTPUT_EXISTS" if not overwrite else "BAD_OPTION",
                   "output exists and is not a folder", path)
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise fail("OUTPUT_EXISTS", "output folder exists and is not empty (use --force to overwrite)", path)
    parent = path.parent if str(path.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".part", dir=parent))
    except OSError as exc:
        raise fail("IO_ERROR", f"cannot create a folder in {parent}: {exc.strerror or exc}", path) from None
    old = None
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        if path.exists():
            if any(path.iterdir()):
                old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=parent))
                os.replace(path, old / "x")
            else:
                path.rmdir()
        os.replace(tmp, path)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not path.exists():
            with contextlib.suppress(OSError):
                os.replace(old / "x", path)  # put the previous folder back
        if isinstance(exc, OSError) and not isinstance(exc, TqzError):  # a TqzError keeps its own words
            raise fail("IO_ERROR", f"cannot write: {exc.strerror or exc}", path, exc.errno) from None
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_folder(out: PathLike, records: list[tuple[str, str, tuple[int, ...]]],
                 tensors: Iterable[tuple[str, torch.Tensor]], files: Mapping[str, bytes],
                 shard_size: int = DEFAULT_SHARD_SIZE, overwrite: bool = False,
                 progress: Optional[Callable[[str, int, int], None]] = None) -> list[str]:
    """Write ``tensors`` (in the order of ``records``: name, dtype, shape) as a safetensors folder
    with ``files``; returns the shard file names."""
    if not isinstance(shard_size, int) or isinstance(shard_size, bool) or shard_size < 1:
        raise fail("BAD_OPTION", f"shard size must be a positive number of bytes, got {shard_size!r}")
    # spec §5.4: a valid name that a safetensors header cannot hold (its metadata key). A Hugging
    # Face folder keeps names as they are, so refuse the folder rather than rename the tensor
    for name, _, _ in records:
        if name == "__metadata__":
            raise fail("BAD_INPUT", "a tensor named '__metadata__' cannot be written to a Hugging Face folder "
                                    "(safetensors reserves that key); decode to .pt or .safetensors instead", out)
    files = check_files(files)
    plan = plan_shards(records, shard_size)
    names = shard_names(len(plan))
    shard_of = {i: s for s, members in enumerate(plan) for i in members}
    with atomic_folder(out, overwrite) as tmp:
        for name, data in files.items():
            (tmp / name).write_bytes(data)
        writers: dict[int, _ShardWriter] = {}
        with contextlib.ExitStack() as stack:
            stack.callback(lambda: [w.f.close() for w in writers.values()])
            total, weight_map, count = _write_shards(tmp, records, tensors, plan, names, shard_of, writers,
                                                     progress)
        if count != len(records):
            raise fail("BAD_PAYLOAD", f"{count} tensors decoded, the manifest lists {len(records)}")
        if not records:  # an empty model: one empty shard, as safetensors writes it
            _ShardWriter(tmp / names[0], []).close()
        if len(names) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2, ensure_ascii=False) + "\n", "utf-8")
    return names


def _write_shards(tmp: Path, records: list, tensors: Iterable[tuple[str, torch.Tensor]], plan: list,
                  names: list[str], shard_of: dict, writers: dict,
                  progress: Optional[Callable[[str, int, int], None]]) -> tuple[int, dict, int]:
    total = 0
    weight_map: dict[str, str] = {}
    count = 0
    i = 0
    for item in tensors:  # (name, tensor) or (name, row block, first row)
        name, t, start = item if len(item) == 3 else (item[0], item[1], 0)
        if i >= len(records) or records[i][0] != name:
            raise fail("BAD_PAYLOAD", f"tensor {name!r} out of the manifest's order")
        s = shard_of[i]
        if s not in writers:
            writers[s] = _ShardWriter(tmp / names[s], [records[j] for j in plan[s]])
        w = writers[s]
        complete = w.write(name, t, start)
        del t, item
        if not complete:
            continue
        i += 1
        weight_map[name] = names[s]
        if w.left == 0:
            total += w.total
            w.close()
        count += 1
        if progress:
            progress(f"writing: {name}", count, len(records))
    return total, weight_map, count


def parse_size(text: str) -> int:
    """'5GB', '500MB', '2GiB', '1000' -> bytes (as transformers' max_shard_size)."""
    s = str(text).strip().upper().replace(" ", "")
    units = {"KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "TIB": 1 << 40, "KB": 10**3, "MB": 10**6,
             "GB": 10**9, "TB": 10**12, "K": 10**3, "M": 10**6, "G": 10**9, "B": 1}
    for u, mult in units.items():
        if s.endswith(u):
            num = s[:-len(u)]
            break
    else:
        num, mult = s, 1
    try:
        value = float(num)
    except ValueError:
        raise fail("BAD_OPTION", f"not a size: {text!r} (e.g. 5GB, 500MB, 2GiB)") from None
    n = int(value * mult)
    if n < 1:
        raise fail("BAD_OPTION", f"shard size must be positive, got {text!r}")
    return n
