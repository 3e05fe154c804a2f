"""Files a user hands to tqcodec or gets from it: atomic outputs and model files.

Model files are read safely: ``.pt``/``.pth`` only through ``torch.load(weights_only=True)``
(never a fallback to full unpickling), ``.safetensors`` through safetensors. Outputs are
written to a temporary file in the target directory, fsynced and renamed, so a failure
leaves any previous file intact and no partial file behind.
"""
from __future__ import annotations

import contextlib
import errno
import os
import re
import tempfile
import warnings
from pathlib import Path
from typing import BinaryIO, Iterator, Mapping, Union

import torch
from safetensors.torch import load_file
from safetensors.torch import save as save_safetensors

from ..errors import TqzError, fail
from ..processes import deferred, interrupt_wins
from ..pipeline.tensors import check_tensor

PathLike = Union[str, os.PathLike]
STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "module", "weights")


TEMP_SUFFIX = ".part"


def temp_name_prefix(path: PathLike) -> str:
    """Temporary files for ``path`` are ``.<name>.<random>.part`` in the same directory."""
    return f".{Path(path).name}."


def _new_file_mode() -> int:
    """0o666 less the umask: the mode ``open()`` would give a new file (mkstemp gives 0o600)."""
    try:
        with open("/proc/self/status", "rb") as f:  # Linux: read without changing the umask
            for line in f:
                if line.startswith(b"Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def _fsync_directory(directory: Path) -> None:
    """Make a rename durable (POSIX); silently skipped where directories cannot be fsynced."""
    with contextlib.suppress(OSError, AttributeError):
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_output(path: PathLike, overwrite: bool = True) -> Iterator[BinaryIO]:
    """Yield a binary file that becomes ``path`` only if the block completes.

    The bytes go to ``.<name>.<random>.part`` in the target directory, are flushed and
    fsynced, and the file is then renamed over ``path`` (or, without ``overwrite``, hard-linked
    to ``path``, which fails if ``path`` appeared meanwhile: no check-then-write race). Any
    exception, including ENOSPC and KeyboardInterrupt, removes the temporary file and leaves a
    previous ``path`` untouched. Only a process killed outright (SIGKILL, power loss) can leave
    the ``.part`` file behind; ``path`` is then still the old file or absent, never partial.
    """
    path = Path(path)
    if not overwrite and path.exists():
        raise fail("OUTPUT_EXISTS", "output exists (use --force to overwrite)", path)
    directory = path.parent if str(path.parent) else Path(".")
    tmp = None
    try:
        try:
            # a Ctrl-C as the file appears is raised once its name is known, so that it is removed
            with deferred():
                fd, tmp = tempfile.mkstemp(prefix=temp_name_prefix(path), suffix=TEMP_SUFFIX, dir=directory)
        except OSError as exc:
            raise fail("IO_ERROR", f"cannot create a file in {directory}: {exc.strerror or exc}", path,
                       exc.errno) from None
        with contextlib.suppress(OSError, AttributeError):
            os.fchmod(fd, _new_file_mode())
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            _link_new(tmp, path)
        _fsync_directory(directory)
    except BaseException as exc:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        if isinstance(exc, OSError) and not isinstance(exc, TqzError):  # a TqzError keeps its own words
            raise fail("IO_ERROR", f"cannot write: {exc.strerror or exc}", path, exc.errno) from None
        raise


def _link_new(tmp: str, path: Path) -> None:
    """Give ``tmp`` the name ``path`` only if no such name exists (then remove ``tmp``)."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise fail("OUTPUT_EXISTS", "output exists (use --force to overwrite)", path) from None
    except OSError:  # a file system without hard links: check, then rename
        if os.path.lexists(path):
            raise fail("OUTPUT_EXISTS", "output exists (use --force to overwrite)", path) from None
        os.replace(tmp, path)
        return
    with contextlib.suppress(OSError):
        os.unlink(tmp)


def same_file(a: PathLike, b: PathLike) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _plain_tensors(obj: object, path: PathLike) -> dict[str, torch.Tensor]:
    """A flat name -> tensor dict from what torch.load returned (spec-free, encoder input rules)."""
    if isinstance(obj, Mapping):
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return _checked(obj, path)
        for key in STATE_DICT_KEYS:
            inner = obj.get(key) if all(isinstance(k, str) for k in obj) else None
            if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                return _checked(inner, path)
        bad = next(((k, v) for k, v in obj.items() if not isinstance(v, torch.Tensor)), None)
        if bad is not None:
            raise fail("BAD_INPUT", f"not a state_dict of plain tensors: {bad[0]!r} holds a "
                                    f"{type(bad[1]).__name__} (and no 'state_dict' or 'model' key holds one)", path)
        raise fail("BAD_INPUT", "the file holds an empty state_dict", path)
    raise fail("BAD_INPUT", f"not a state_dict: the file holds a {type(obj).__name__}", path)


def _checked(sd: Mapping, path: PathLike) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        check_tensor(k, v, path)
        out[k] = v.detach()
    return out


def read_model(path: PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a ``.pt``/``.pth``/``.bin`` (weights_only) or ``.safetensors`` file."""
    path = Path(path)
    if not path.is_file():
        missing = not path.exists()
        raise fail("IO_ERROR", "no such file" if missing else "not a regular file", path,
                   errno.ENOENT if missing else errno.EISDIR if path.is_dir() else None)
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        try:
            return _checked(load_file(str(path)), path)
        except TqzError:
            raise
        except Exception as exc:
            raise fail("BAD_INPUT", f"not a readable safetensors file ({exc})", path) from None
    if suffix in (".pt", ".pth", ".bin", ".ckpt"):
        try:
            with interrupt_wins():
                obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises UnpicklingError, RuntimeError, KeyError, ... on bad files
            raise fail("BAD_INPUT", _refusal(path, exc), path) from None
        return _plain_tensors(obj, path)
    raise fail("BAD_INPUT", f"unknown input type {suffix or '(no suffix)'}: expected .pt, .pth, .bin or "
                            ".safetensors", path)


SAVE_AS_SAFETENSORS = ("load it in Python (only if you trust where it came from), take its state dict of tensors "
                       "and save that with safetensors.torch.save_file(state_dict, 'model.safetensors'), then "
                       "encode the .safetensors file")


def _refusal(path: Path, exc: Exception) -> str:
    """Why a ``.pt`` file was refused, in words a user can act on: the code object it holds (never
    run), a file that is no PyTorch checkpoint at all, or what torch's safe loader said."""
    text = str(exc)
    found = re.search(r"GLOBAL ([\w.]+)", text)
    if found:
        return (f"the checkpoint refers to {found.group(1)} (Python code, not a tensor); tqcodec reads .pt files "
                f"only with torch.load(weights_only=True) and never runs their code: {SAVE_AS_SAFETENSORS}")
    with open(path, "rb") as f:
        head = f.read(4)
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):  # a zip archive, or a pickle's protocol opcode
        return (f"not a PyTorch checkpoint: it starts with {head!r}, neither the zip archive torch.save writes nor "
                "a pickle")
    said = next((line.strip() for line in text.splitlines()
                 if line.strip() and "weights_only" not in line and "trusted source" not in line), type(exc).__name__)
    return f"not a checkpoint of plain tensors ({said[:160]}): {SAVE_AS_SAFETENSORS}"


class _KeepOSError:
    """A file's ``write`` that remembers the OSError it raised (torch.save hides it)."""

    def __init__(self, f: BinaryIO):
        self._f = f
        self.error: OSError | None = None

    def write(self, b) -> int:
        try:
            return self._f.write(b)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        self._f.flush()


SAFETENSORS_RESERVED = "__metadata__"  # the key of a safetensors header that holds its metadata


def safetensors_key(name: str) -> str:
    """The safetensors key of tensor ``name`` (spec §5.4, the conformance decoder protocol): a tensor
    named ``__metadata__`` goes under ``/__metadata__`` (no valid name starts with ``/``, so the
    mapping is injective), every other tensor under its own name."""
    return "/" + name if name == SAFETENSORS_RESERVED else name


def safetensors_bytes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None,
                      path: PathLike | None = None) -> bytes:
    """``tensors`` as the bytes of a ``.safetensors`` file: tied tensors written twice (the format
    has no shared storage); a tensor named ``__metadata__`` (its header's metadata key) under
    ``/__metadata__``, with a warning (spec §5.4). ``path``: the output, for messages."""
    where = f"{path}: " if path is not None else ""
    seen: set[int] = set()
    plain = {}
    for k, v in tensors.items():  # safetensors refuses shared storage: copy tied tensors
        key = safetensors_key(k)
        if key != k:
            if key in tensors:
                raise fail("BAD_INPUT", f"tensors {k!r} and {key!r} would share the safetensors key {key!r}", path)
            warnings.warn(f"{where}tensor {k!r} written as {key!r} (safetensors reserves {k!r})", stacklevel=3)
        ptr = v.untyped_storage().data_ptr() if v.numel() else -1
        plain[key] = v.clone() if ptr in seen else v.contiguous()
        if ptr != -1:
            seen.add(ptr)
    return save_safetensors(plain, metadata=dict(metadata) if metadata else None)


def write_model(tensors: Mapping[str, torch.Tensor], path: PathLike, overwrite: bool,
                metadata: Mapping[str, str] | None = None) -> None:
    """Write ``tensors`` as ``.safetensors`` or ``.pt`` by the suffix of ``path``, atomically.

    A ``.safetensors`` file cannot hold a tensor named ``__metadata__`` (its header's metadata key):
    such a tensor is written as ``/__metadata__``, with a warning (spec §5.4)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        data = safetensors_bytes(tensors, metadata, path)
        with atomic_output(path, overwrite) as f:
            f.write(data)
    elif suffix in (".pt", ".pth", ".bin"):
        with atomic_output(path, overwrite) as f:
            sink = _KeepOSError(f)
            try:
                with interrupt_wins():
                    torch.save(dict(tensors), sink)
            except RuntimeError:
                # torch's C++ writer turns a failed write (ENOSPC, EIO) into a RuntimeError
                if sink.error is not None:
                    raise sink.error from None
                raise
    else:
        raise fail("BAD_OPTION", f"cannot write {suffix or '(no suffix)'}: use .pt or .safetensors", path)
