"""Files written whole or not at all, and write failures that say which file and why.

Every file rvsepp writes in one piece (checkpoints, feature arrays, captions, JSON, caches,
the curves) goes through :func:`atomic_write`: the bytes go to a temporary file in the
target's folder (``.NAME.PID-RANDOM.tmp``), are flushed and fsynced, and the temporary is
renamed over the target (atomic on POSIX), then the folder is fsynced. A reader sees the
old file or the complete new one, never a partial write; a failure removes the temporary.

A process killed during a write (``kill -9``, a power cut) cannot remove its temporary;
:func:`remove_stale_temporaries` removes those of processes that no longer run, and each
writer calls it on its folders when it starts.

Every failure to write (no space, quota, permission, read-only file system, a file where a
folder should be, ...) is raised as :class:`WriteError`, an ``OSError`` whose message names
the path and the cause in words.
"""

from __future__ import annotations

import errno
import os
import re
import secrets
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import BinaryIO

__all__ = [
    "WriteError",
    "atomic_write",
    "atomic_write_bytes",
    "ensure_folder",
    "fsync_folder",
    "is_temporary",
    "remove_stale_temporaries",
    "write_error",
]

# Causes in words, with what the user can do about them.
_CAUSES = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "the file system is read-only",
    errno.ENOENT: "its folder does not exist",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EISDIR: "the path is a folder",
    errno.EEXIST: "the path exists and is not a folder",
    errno.EFBIG: "the file is larger than this system allows (file size limit)",
    errno.EIO: "an input/output error (a failing disk or network file system?)",
    errno.ENAMETOOLONG: "the name is too long",
    errno.EMFILE: "too many open files",
}

# A temporary of this module: ".NAME.PID-RANDOM.tmp"; ".NAME.PID.tmp" and "NAME.tmp-PID" are
# the names earlier versions used.
_TEMPORARY = re.compile(r"^\.(?P<target>.+)\.(?P<pid>\d+)(?:-[0-9a-f]+)?\.tmp$")
_OLD_TEMPORARY = re.compile(r"^(?P<target>.+)\.tmp-(?P<pid>\d+)$")


class WriteError(OSError):
    """A file or folder could not be written; the message names the path and the cause."""

    def __init__(self, path: str | os.PathLike, cause: str, code: int | None = None) -> None:
        super().__init__(code, cause)
        self.path = Path(path)
        self.cause = cause

    def __str__(self) -> str:
        return f"cannot write {self.path}: {self.cause}"


def write_error(path: str | os.PathLike, error: OSError) -> WriteError:
    """``error`` (raised while writing ``path``) as a :class:`WriteError`."""
    if isinstance(error, WriteError):
        return error
    code = error.errno
    cause = _CAUSES.get(code) if code is not None else None
    if cause is None:
        cause = error.strerror or str(error) or type(error).__name__
    if code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        cause += "; free some space or write to another folder"
    elif code in (errno.EACCES, errno.EPERM, errno.EROFS):
        cause += "; choose a folder you can write to"
    return WriteError(path, cause, code)


def _is_about(error: OSError, paths: Iterable[Path]) -> bool:
    """Whether ``error`` came from writing one of ``paths`` (not from reading another file):
    errors of ``write``/``fsync`` name no file, those of ``open``/``rename`` name ours."""
    if error.filename is None:
        return True
    names = {os.fspath(error.filename), os.fspath(error.filename2 or error.filename)}
    return bool(names & {os.fspath(path) for path in paths})


def ensure_folder(folder: str | os.PathLike) -> Path:
    """Create ``folder`` (and its parents) if needed; a failure is a :class:`WriteError`."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise WriteError(folder, "it exists and is a file, not a folder", errno.ENOTDIR)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise write_error(folder, error) from None
    return folder


def fsync_folder(folder: str | os.PathLike) -> None:
    """Make a rename in ``folder`` durable (not every file system can fsync a folder)."""
    try:
        handle = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:
        pass
    finally:
        os.close(handle)


def _temporary_path(target: Path) -> Path:
    return target.with_name(f".{target.name}.{os.getpid()}-{secrets.token_hex(3)}.tmp")


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> None:
    """Write ``path`` through ``write(handle)`` so that ``path`` is always the old or the
    complete new file. The folder is created if missing. Errors while writing are
    :class:`WriteError` naming ``path``; any other exception of ``write`` passes unchanged.
    Either way the temporary file is removed and ``path`` is untouched."""
    path = Path(path)
    ensure_folder(path.parent)
    remove_stale_temporaries(path.parent, {path.name})
    temporary = _temporary_path(path)
    try:
        with open(temporary, "xb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except OSError as error:
        _remove(temporary)
        if _is_about(error, (path, temporary)):
            raise write_error(path, error) from None
        raise
    except BaseException:
        _remove(temporary)
        raise
    fsync_folder(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_write`)."""
    atomic_write(path, lambda handle: handle.write(data))


def _remove(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass  # the write's own error is the one to report


def _process_runs(pid: int) -> bool:
    if pid == os.getpid():
        return False  # this process has no write in progress when it cleans up
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    except (OverflowError, ValueError):
        return False
    return True


def is_temporary(name: str) -> bool:
    """Whether ``name`` is the name of an atomic write's temporary file."""
    return bool(_TEMPORARY.match(name) or _OLD_TEMPORARY.match(name))


def remove_stale_temporaries(
    folder: str | os.PathLike, targets: Iterable[str] | None = None
) -> list[Path]:
    """Remove the temporaries in ``folder`` left by interrupted writes of processes that no
    longer run (only those for the file names in ``targets``, when given). Returns them."""
    folder = Path(folder)
    wanted = None if targets is None else set(targets)
    removed = []
    try:
        entries = list(folder.iterdir())
    except OSError:
        return removed
    for entry in entries:
        match = _TEMPORARY.match(entry.name) or _OLD_TEMPORARY.match(entry.name)
        if match is None or (wanted is not None and match["target"] not in wanted):
            continue
        if _process_runs(int(match["pid"])) or not entry.is_file():
            continue
        try:
            entry.unlink()
        except OSError as error:
            raise write_error(entry, error) from None
        removed.append(entry)
    return removed
