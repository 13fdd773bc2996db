"""Locks of the store: flock(2) on files in ``locks/``, and one lock for a whole job.

featurize and score share a lock on their checkpoint or experiment; finalize_features and
finalize_scores take it exclusively and are refused (:class:`StoreBusyError`) while
another process writes there. A jax.distributed job takes an exclusive lock once, on
process 0, for all its processes (:func:`job_lock`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

from .errors import StoreBusyError, StoreCorruptedError, writing

__all__ = ["flock", "job_lock", "SKIP", "GO"]

# What process 0 of a job decided (broadcast to every process).
SKIP, GO, BUSY, FAILED = 0, 1, 2, 3


@contextlib.contextmanager
def flock(path: Path, *, shared: bool = False, wait: bool = False,
          busy: str = "", reading: bool = False) -> Iterator[bool]:
    """Hold the flock(2) lock of file ``path`` (created empty) for the ``with`` block.

    Args:
      shared: many shared holders may coexist; an exclusive holder is alone.
      wait: block until the lock is free; otherwise raise :class:`StoreBusyError` with
        ``busy`` as its message.
      reading: a reader's shared lock: where the lock file cannot be created or written
        (a read-only store, another user's), it is opened read-only, and where it does not
        exist and cannot be made, no lock is held (nobody can be writing there). Yields
        whether a lock is held.
    """
    fd = _open_lock(path, reading)
    if fd is None:
        yield False
        return
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise StoreCorruptedError(
                f"{str(path)!r} is not a regular file ({oct(stat.S_IFMT(info.st_mode))}); "
                "lock files are empty regular files. Delete it (no process of this store "
                "must be running): it is created again.")
        flags = (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | (0 if wait else fcntl.LOCK_NB)
        try:
            fcntl.flock(fd, flags)
        except BlockingIOError:
            raise StoreBusyError(
                busy or f"{str(path)!r} is held by another process; retry when it is done."
            ) from None
        yield True
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def _open_lock(path: Path, reading: bool) -> int | None:
    flags = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        path.parent.mkdir(exist_ok=True)
        return os.open(path, os.O_RDWR | os.O_CREAT | flags, 0o666)
    except OSError as err:
        failed = err
    if failed.errno != errno.ELOOP and reading and failed.errno in (
            errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOENT):
        try:
            return os.open(path, os.O_RDONLY | flags)
        except FileNotFoundError:
            return None  # a read-only store without this lock file: nobody writes there
        except OSError as err:
            failed = err
    if failed.errno == errno.ELOOP:
        raise StoreCorruptedError(
            f"{str(path)!r} is a symbolic link; the store follows no link. Delete it (no "
            "process of this store must be running): it is created again.")
    with writing(path, "a lock file"):
        raise failed


@contextlib.contextmanager
def job_lock(acquire: Callable[[], contextlib.AbstractContextManager],
             decide: Callable[[], bool], *, first: bool,
             broadcast: Callable[[int], int], busy: str, failed: str) -> Iterator[bool]:
    """An exclusive lock held by process 0 for every process of a job; yields "go".

    Process 0 enters ``acquire()`` (the store's exclusive lock) and calls ``decide()``
    (True: there is work to do), and the outcome is broadcast: the other processes act
    while process 0 holds the lock, without taking it themselves (exclusive flocks of one
    job's processes would exclude each other). Every process raises when process 0 could
    not get the lock (StoreBusyError with ``busy``) or failed (RuntimeError with
    ``failed``; process 0 raises its own error), so none is left waiting at a barrier.
    With one process this is simply the exclusive lock.

    Args:
      first: whether this is process 0.
      broadcast: process 0's int on every process (:func:`trax_attr.parallel.broadcast_int`).
    """
    with contextlib.ExitStack() as held:
        status, error = SKIP, None
        if first:
            try:
                held.enter_context(acquire())
                status = GO if decide() else SKIP
            except Exception as err:  # every process must hear of it, or they would hang
                status, error = (BUSY if isinstance(err, StoreBusyError) else FAILED), err
        status = broadcast(status)
        if error is not None:
            raise error
        if status == BUSY:
            raise StoreBusyError(busy)
        if status == FAILED:
            raise RuntimeError(failed)
        yield status == GO
