"""The store's errors, and the one place a failed write becomes a :class:`StoreWriteError`."""

from __future__ import annotations

import contextlib
import errno
from collections.abc import Iterator
from pathlib import Path

__all__ = ["StoreBusyError", "StoreWriteError", "StoreCorruptedError", "writing", "repair_hint"]


class StoreBusyError(RuntimeError):
    """Another process holds a lock that this operation needs; retry when it is done."""


class StoreWriteError(OSError):
    """A write to the store failed (disk full, read-only or unwritable save_dir).

    ``errno`` is that of the failed system call; what was on disk before is unchanged.
    """


class StoreCorruptedError(ValueError):
    """A file of the store is damaged, missing, replaced (by a link, a FIFO, a device, a
    folder), does not match its size and checksum record, or was written with other
    settings than ``store.json`` holds. The message names the file and the fix; nothing
    of it was used."""


_WRITE_ERRNOS = {errno.ENOSPC: "the device is full", errno.EDQUOT: "the disk quota is exceeded",
                 errno.EROFS: "the filesystem is read-only",
                 errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
                 errno.EFBIG: "the file is too large for this filesystem",
                 errno.ENOTDIR: "a parent of save_dir is a file, not a folder",
                 errno.EISDIR: "a folder stands where a file of the store belongs",
                 errno.ENOTEMPTY: "a folder stands where a file of the store belongs",
                 errno.EIO: "an input/output error (a failing disk?)"}


@contextlib.contextmanager
def writing(path: Path, what: str) -> Iterator[None]:
    """Turn an OSError of a write into a StoreWriteError that says what to do."""
    try:
        yield
    except (StoreWriteError, StoreCorruptedError):
        raise
    except OSError as err:
        if err.errno not in _WRITE_ERRNOS:
            raise
        raise StoreWriteError(
            err.errno,
            f"could not write {what} at {str(path)!r}: {_WRITE_ERRNOS[err.errno]} ({err}). "
            "Nothing already stored was changed: free space or fix the permissions of save_dir "
            "(or pass another save_dir) and call the same method again; finished rows are kept.",
        ) from err


def repair_hint(path: Path) -> str:
    """How to recover from a damaged ``path`` (what to delete so it is recomputed)."""
    if path.name == "store.json":
        return ("Restore it from a backup (or from the save_dir this one was copied from), "
                "or start a new save_dir.")
    return (f"Delete the folder {str(path.parent)!r} to recompute what it held (other "
            "checkpoints and experiments are not affected).")
