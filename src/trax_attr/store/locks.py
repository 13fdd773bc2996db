"""Locks of the store: flock(2) on files in ``locks/``, and one lock for a whole job.

featurize and score share a lock on their checkpoint or experiment; finalize_features and
finalize_scores take it exclusively and are refused (:class:`StoreBusyError`) while
another process writes there. A jax.distributed job takes an exclusive lock once, on
process 0, for all its processes (:func:`job_lock`).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from .files import StoreBusyError, writing

__all__ = ["flock", "job_lock", "SKIP", "GO"]

# What process 0 of a job decided (broadcast to every process).
SKIP, GO, BUSY, FAILED = 0, 1, 2, 3


@contextlib.contextmanager
def flock(path: Path, *, shared: bool = False, wait: bool = False,
          busy: str = "") -> Iterator[None]:
    """Hold the flock(2) lock of file ``path`` (created empty) for the ``with`` block.

    Args:
      shared: many shared holders may coexist; an exclusive holder is alone.
      wait: block until the lock is free; otherwise raise :class:`StoreBusyError` with
        ``busy`` as its message.
    """
    with writing(path, "a lock file"):
        path.parent.mkdir(exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    try:
        flags = (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | (0 if wait else fcntl.LOCK_NB)
        try:
            fcntl.flock(fd, flags)
        except BlockingIOError:
            raise StoreBusyError(
                busy or f"{str(path)!r} is held by another process; retry when it is done."
            ) from None
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


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
