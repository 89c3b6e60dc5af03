"""Writing one whole output file: atomically to a path, or as a stream to stdout or a special file.

Every file a command writes for the user (exports, OpenMetrics text, the HTML report, the alert
state) goes through :func:`write_output`, so they all share one behaviour:

- ``-`` means standard output: the bytes are streamed to it (nothing to replace atomically).
- A path that names a special file -- a device, a FIFO, a socket, or anything under ``/dev/``
  or ``/proc/`` such as ``/dev/stdout`` (a symlink to the caller's own output) -- is opened and
  written in place.  It is never replaced: replacing ``/dev/stdout`` as root would turn the
  machine's symlink into a regular file.
- Any other path is written to a dot-prefixed temporary file beside it, fsynced, renamed over it
  and the directory fsynced: readers see the old file or the new one, never a half-written one,
  and a failure leaves neither a partial file nor the temporary behind.  A symlink stays a
  symlink: the file it points to is replaced.

The Parquet history has its own link-into-place protocol (``store.py``): runs are never replaced.
"""
from __future__ import annotations

import os
import secrets
import stat
import sys
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from .errors import ConfigError, RomaError

__all__ = ["STDOUT", "write_output", "is_stream_target", "checked_target"]

#: The name that means standard output.
STDOUT = "-"
_SPECIAL_PREFIXES = ("/dev/", "/proc/")


class _WholeWrites:
    """A binary file whose ``write`` writes every byte or raises.  A buffered file's ``write``
    may return a short count instead (seen on a pipe whose reader has gone: 64 KiB of 3 MB
    "written", no error): that must never pass for a complete output."""

    def __init__(self, file: BinaryIO) -> None:
        self._file = file

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        done = 0
        while done < len(view):
            wrote = self._file.write(view[done:])
            if not wrote:
                raise OSError(f"the output accepted no more bytes after {done} of {len(view)}")
            done += wrote
        return done

    def __getattr__(self, name):  # flush, fileno, tell... of the underlying file
        return getattr(self._file, name)


def is_stream_target(out: str | os.PathLike) -> bool:
    """True when ``out`` is written in place as a stream: ``-``, a device, FIFO or socket, or a
    path under ``/dev/`` or ``/proc/``."""
    text = os.fspath(out)
    if text == STDOUT or os.path.abspath(text).startswith(_SPECIAL_PREFIXES):
        return True
    try:
        mode = os.stat(text).st_mode
    except OSError:
        return False
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))


def checked_target(out, *, example: str = "out.csv", flag: str = "--out") -> Path | str:
    """``out`` checked before any work is done: ``-``/a special file as given, else a
    :class:`Path` whose directory exists.  ConfigError saying what to do otherwise."""
    if out is None or str(out) == "":
        raise ConfigError(f"no output file given; pass {flag} PATH (or {flag} - for standard output)")
    if is_stream_target(out):
        return STDOUT if os.fspath(out) == STDOUT else Path(out)
    target = Path(out)
    if target.is_dir():
        raise ConfigError(f"{flag} {target} is a directory; give a file name such as {target / example}")
    parent = Path(os.path.realpath(target)).parent
    if not parent.exists():
        raise ConfigError(f"cannot write {target}: the directory {parent} does not exist; create it first")
    if not parent.is_dir():
        raise ConfigError(f"cannot write {target}: {parent} is not a directory")
    return target


def write_output(out, write: Callable[[BinaryIO], None], *, what: str = "the output",
                 flag: str = "--out", example: str = "out.csv") -> Path | str:
    """Write the bytes ``write(binary_file)`` produces to ``out`` (see the module docstring).

    Returns ``"-"`` for standard output, else the :class:`Path` written.  Raises ConfigError when
    ``out`` cannot be used (a directory, a missing directory, no permission) and RomaError when
    writing fails midway (nothing is left behind).  A closed standard output (``| head``) raises
    BrokenPipeError, which the command line turns into a quiet exit.
    """
    target = checked_target(out, example=example, flag=flag)
    if target == STDOUT:
        stream = sys.stdout.buffer
        sys.stdout.flush()  # text printed before must come first
        write(_WholeWrites(stream))
        stream.flush()
        return STDOUT
    if is_stream_target(target):
        try:
            # No O_CREAT, no O_TRUNC: a device or FIFO is written as it is, never created or replaced.
            with open(os.open(target, os.O_WRONLY | os.O_APPEND), "wb") as stream:
                write(_WholeWrites(stream))
        except PermissionError as exc:
            raise ConfigError(f"cannot write {what} to {target}: permission denied") from exc
        except OSError as exc:
            if isinstance(exc, BrokenPipeError):
                raise
            raise RomaError(f"cannot write {what} to {target}: {exc.strerror or exc}") from exc
        return target
    _replace_atomically(Path(os.path.realpath(target)), write, what=what, shown=target, flag=flag)
    return target


def _replace_atomically(real: Path, write, *, what: str, shown: Path, flag: str) -> None:
    tmp = real.with_name(f".{real.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except PermissionError as exc:
        raise ConfigError(f"cannot write {shown}: permission denied in {real.parent}; "
                          f"choose a writable place ({flag})") from exc
    except OSError as exc:
        raise ConfigError(f"cannot write {shown}: {exc.strerror}") from exc
    try:
        with os.fdopen(fd, "wb") as file:
            write(_WholeWrites(file))
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, real)
    except (PermissionError, IsADirectoryError) as exc:
        raise ConfigError(f"cannot write {shown}: {exc.strerror}; choose another {flag}") from exc
    except OSError as exc:
        raise RomaError(f"cannot write {what} to {shown}: {exc.strerror or exc}; nothing was written") from exc
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(real.parent)


def _fsync_dir(folder: Path) -> None:
    """Make the rename durable; some filesystems refuse to fsync a directory: the rename stands."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
