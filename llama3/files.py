"""Opening a file on a user's behalf: only a regular file, only up to a size limit, never a hang.

A path a person names (the chat's ``/file``, ``--tools``, the side files a conversion copies) may
be a named pipe (reading blocks forever), a device (``/dev/zero`` never ends), a directory, or a
file far larger than anyone meant. Each is refused here with one line that names the path and
what it is. The check is made on the opened descriptor (``fstat``), so a path swapped between a
check and the open cannot slip past it, and the open itself never blocks (``O_NONBLOCK``). At most
``limit + 1`` bytes are ever read, so a file that grows while it is read is refused too.

This module imports nothing from the package except its errors: every module may use it.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import LlamaError

__all__ = [
    "FileCheckError",
    "FileTooLargeError",
    "NotARegularFileError",
    "NotTextError",
    "TEXT_LIMIT",
    "SIDE_FILE_LIMIT",
    "check_regular_file",
    "copy_checked",
    "read_bytes",
    "read_text",
]

# What a person pastes into a chat or writes as tool definitions: 16 MiB is far beyond any
# context, and small enough to read at once.
TEXT_LIMIT = 16 * 2**20
# Side files of a checkpoint (tokenizer.model is ~2 MiB, configs a few KiB).
SIDE_FILE_LIMIT = 256 * 2**20


class FileCheckError(LlamaError, OSError):
    """A file named by the user cannot be read as asked; the message names it and says why, and
    ``reason`` says why in a few words (e.g. "a named pipe (FIFO), not a regular file")."""

    reason: str = ""


class NotARegularFileError(FileCheckError):
    """The path is a directory, a named pipe, a socket or a device, not a regular file."""


class FileTooLargeError(FileCheckError):
    """The file is larger than the limit for what it is meant to be."""


class NotTextError(LlamaError, ValueError):
    """The file is not UTF-8 text."""

    reason: str = "not UTF-8 text"


def _error(cls: type[Exception], path: Path, what: str, reason: str, advice: str = "") -> Exception:
    exc = cls(f"{what} {path}: {reason}" + (f"; {advice}" if advice else ""))
    exc.reason = reason  # type: ignore[attr-defined]
    return exc


def _kind(mode: int) -> str | None:
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "a special file"


def _size_text(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n} bytes"


def _refuse_mode(path: Path, mode: int, what: str) -> None:
    kind = _kind(mode)
    if kind is not None:
        raise _error(NotARegularFileError, path, what, f"{kind}, not a regular file",
                     "give the path of an ordinary file")


def _refuse_size(path: Path, size: int, limit: int, what: str) -> None:
    if size > limit:
        raise _error(FileTooLargeError, path, what,
                     f"larger than {_size_text(limit)}, the limit for a {what}", "give a smaller file")


def check_regular_file(path: str | os.PathLike[str], what: str = "file",
                       limit: int = SIDE_FILE_LIMIT) -> Path:
    """``path`` (symlinks followed) if it is a regular file of at most ``limit`` bytes.

    Raises:
        FileNotFoundError: nothing there (a :class:`FileCheckError` too).
        NotARegularFileError / FileTooLargeError: what the message says.
    """
    path = Path(path).expanduser()
    try:
        st = os.stat(path)
    except FileNotFoundError as exc:
        raise _error(_NotFound, path, what, exc.strerror or "No such file or directory") from None
    except OSError as exc:
        raise _error(FileCheckError, path, what, exc.strerror or str(exc)) from None
    _refuse_mode(path, st.st_mode, what)
    _refuse_size(path, st.st_size, limit, what)
    return path


class _NotFound(FileCheckError, FileNotFoundError):
    """Nothing at the path."""


def read_bytes(path: str | os.PathLike[str], what: str = "file", limit: int = SIDE_FILE_LIMIT) -> bytes:
    """The bytes of the regular file ``path``, refused (one line) if it is anything else or larger
    than ``limit``. Opening never blocks and at most ``limit + 1`` bytes are read."""
    path = Path(path).expanduser()
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
    except FileNotFoundError as exc:
        raise _error(_NotFound, path, what, exc.strerror or "No such file or directory") from None
    except IsADirectoryError:
        raise _error(NotARegularFileError, path, what, "a directory, not a regular file",
                     "give the path of an ordinary file") from None
    except OSError as exc:
        raise _error(FileCheckError, path, what, exc.strerror or str(exc)) from None
    try:
        st = os.fstat(fd)
        _refuse_mode(path, st.st_mode, what)
        _refuse_size(path, st.st_size, limit, what)
    except BaseException:
        os.close(fd)
        raise
    with os.fdopen(fd, "rb") as handle:
        try:
            data = handle.read(limit + 1)
        except OSError as exc:
            raise _error(FileCheckError, path, what, exc.strerror or str(exc)) from None
    _refuse_size(path, len(data), limit, what)  # it grew while being read
    return data


def read_text(path: str | os.PathLike[str], what: str = "file", limit: int = TEXT_LIMIT) -> str:
    """The UTF-8 text of the regular file ``path`` (see :func:`read_bytes`).

    Raises:
        NotTextError: the bytes are not UTF-8.
    """
    data = read_bytes(path, what, limit)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _error(NotTextError, Path(path).expanduser(), what, "not UTF-8 text",
                     f"byte {exc.start} cannot be decoded") from None


def copy_checked(src: str | os.PathLike[str], dst: str | os.PathLike[str], what: str = "file",
                 limit: int = SIDE_FILE_LIMIT, validate: Callable[[Path], Any] | None = None) -> Path:
    """Copy the regular file ``src`` (a symlink is followed and its target checked) to ``dst``.

    ``validate(path)`` (e.g. "parses as a tokenizer") runs on ``src`` first and raises if the file
    is not what it is meant to be; nothing is written then. Returns ``dst``.
    """
    src_path = check_regular_file(src, what, limit)
    if validate is not None:
        validate(src_path)
    data = read_bytes(src_path, what, limit)  # the bytes checked are the bytes copied
    dst_path = Path(dst)
    with open(dst_path, "wb") as out:
        out.write(data)
    return dst_path
