"""The one exception hierarchy of tqcodec (spec §11, "Error codes").

Every error the package raises for bad input, a bad file or a bad option is a
:class:`TqzError`. Its ``code`` is one of the stable names of spec §11; tools and
conformance tests compare codes, never messages.
"""
from __future__ import annotations

import errno as _errno
import os
from typing import Optional, Union

# spec §11: the closed table of error codes. Order and names are stable.
ERROR_CODES: dict[str, str] = {
    "TRUNCATED": "the file ends before a structure it declares",
    "BAD_MAGIC": "the file does not start with the .tqz magic (not a .tqz file)",
    "UNSUPPORTED_VERSION": "major version 0 or a major version this reader does not know",
    "UNKNOWN_REQUIRED_FEATURE": "a required feature bit this reader does not know is set",
    "RESERVED_NONZERO": "a reserved field is not zero (v1.0 has none; kept for later versions)",
    "CHECKSUM_MISMATCH": "a CRC-32 does not match the bytes it covers",
    "BAD_MANIFEST": "the manifest is not canonical msgpack of the form §5 defines",
    "BAD_TENSOR_RECORD": "a tensor record is malformed (name, dtype, shape, mode parameters)",
    "LIMIT_EXCEEDED": "a count or size is over a limit of §12",
    "BAD_CHUNK": "a chunk header is malformed, out of order, or does not match the manifest",
    "UNKNOWN_CHUNK": "a critical chunk type this reader does not know",
    "BAD_INDEX": "the index or footer does not match the chunks it describes",
    "TRAILING_DATA": "bytes after the footer",
    "UNKNOWN_MODE": "a coding mode this reader does not know",
    "BAD_TABLE": "a frequency table is malformed (length, zero entry, sum not 2^24)",
    "BAD_STEP": "a step code outside the allowed range",
    "BAD_PAYLOAD": "a payload does not decode to what its record declares",
    "BAD_INPUT": "an input model file the encoder cannot take (not plain tensors, bad dtype, ...)",
    "BAD_OPTION": "an option or argument value that is not allowed",
    "OUTPUT_EXISTS": "the output file exists and overwriting was not asked for",
    "IO_ERROR": "the operating system failed to read or write a file",
    "EVALUATE_FAILED": "the evaluation of a candidate file (save(evaluate=...), --evaluate) failed or gave no number",
    "METRIC_NOT_MET": "no rate the encoder tried gives the metric asked for (save(evaluate=...), --evaluate)",
}

# codes of the encoder and the command line: they never concern a file's validity
ENCODER_CODES = ("BAD_INPUT", "BAD_OPTION", "OUTPUT_EXISTS", "IO_ERROR", "EVALUATE_FAILED", "METRIC_NOT_MET")


class TqzError(Exception):
    """Base of every error tqcodec raises for bad input, files or options.

    ``code`` is a stable name from spec §11; ``path`` names the file concerned
    (or None); ``message`` says what is wrong in words.
    """

    def __init__(self, code: str, message: str, path: Optional[Union[str, os.PathLike]] = None):
        if code not in ERROR_CODES:
            raise ValueError(f"unknown TqzError code {code!r}")
        self.code = code
        self.message = message
        self.path = None if path is None else os.fspath(path)
        super().__init__(self.__str__())

    def __str__(self) -> str:
        where = f"{self.path}: " if self.path else ""
        return f"{where}{self.message} [{self.code}]"

    def __reduce__(self):  # picklable: errors raised in worker processes (tqcodec.parallel) arrive whole
        return (fail, (self.code, self.message, self.path, getattr(self, "errno", None)))

    def with_path(self, path: Union[str, os.PathLike]) -> "TqzError":
        """Return the same error naming ``path`` (kept if one is already named)."""
        if self.path is not None:
            return self
        err = fail(self.code, self.message, path, getattr(self, "errno", None))
        err.__cause__ = self.__cause__
        return err


class FormatError(TqzError):
    """The bytes of a .tqz file break the spec."""


class InputError(TqzError):
    """An input handed to the encoder cannot be encoded."""


class OptionError(TqzError):
    """An option value that is not allowed."""


class TqzOSError(TqzError, OSError):
    """The operating system failed to read or write a file (``IO_ERROR``). Also an ``OSError``,
    so ``except OSError`` catches it as it catches any failed file operation; ``errno`` is the
    system's error number when one is known."""

    def __init__(self, code: str, message: str, path: Optional[Union[str, os.PathLike]] = None,
                 errno: Optional[int] = None):
        super().__init__(code, message, path)
        self.errno = errno
        self.strerror = message
        self.filename = self.path


class TqzFileNotFoundError(TqzOSError, FileNotFoundError):
    """``IO_ERROR`` for a file that does not exist (also a ``FileNotFoundError``)."""


def error_class_for(code: str, errno: Optional[int] = None) -> type[TqzError]:
    """The TqzError subclass that carries ``code`` (``errno``: the system's error number of an
    ``IO_ERROR``)."""
    if code in ("BAD_INPUT",):
        return InputError
    if code in ("BAD_OPTION", "OUTPUT_EXISTS"):
        return OptionError
    if code == "IO_ERROR":
        return TqzFileNotFoundError if errno == _errno.ENOENT else TqzOSError
    return FormatError


def fail(code: str, message: str, path: Optional[Union[str, os.PathLike]] = None,
         errno: Optional[int] = None) -> TqzError:
    """Build (not raise) the error of the right class for ``code``."""
    cls = error_class_for(code, errno)
    return cls(code, message, path, errno) if issubclass(cls, TqzOSError) else cls(code, message, path)


class TqzWarning(UserWarning):
    """Work done, with something the user should know (e.g. a data-free rate likely too low)."""
