"""Writes of the store's files: atomic replacement, reserved blocks, rows flushed before flags.

Every write goes through :func:`~.errors.writing`, which turns a failed system call into a
:class:`~.errors.StoreWriteError`. New files are made beside their final name (mode 0o666
less the umask), fsynced and renamed, so a reader sees the old file or the new one.
"""

from __future__ import annotations

import errno
import io
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .checksums import bytes_record, row_checks
from .errors import writing
from .reading import npy_header, open_file

__all__ = ["RowArrays", "KeptRows", "replace_file_atomic", "write_json_atomic", "fsync_dir",
           "write_rows", "CHECKED", "write_flagged_rows", "reserve", "stage_array", "save_array",
           "create_zeros"]


def _new_temp(path: Path, suffix: str) -> tuple[Path, int]:
    """A new file beside ``path`` (O_EXCL, no link followed), mode 0o666 less the umask:
    not mkstemp, whose 0600 would lock the other users of a shared store out."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.{suffix}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o666)
    return tmp, fd


def replace_file_atomic(path: Path, write: Callable[[Any], None], *, binary: bool = False) -> None:
    """Replace ``path`` by what ``write(handle)`` writes, atomically: readers see the old
    file or the new one (temp file in the same folder, fsync, rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp, fd = _new_temp(path, "tmp")
    try:
        with os.fdopen(fd, "wb" if binary else "w") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        raise


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Replace ``path`` by ``data`` as JSON, atomically: readers see the old or the new.

    Call with the store's ``meta`` lock held (it also removes temp files of killed writers).
    """
    with writing(path, "metadata"):
        path.parent.mkdir(parents=True, exist_ok=True)
        for stale in path.parent.glob(f".{path.name}.*.tmp"):
            stale.unlink()  # left by a killed writer; callers hold the meta lock
        replace_file_atomic(path, lambda handle: json.dump(data, handle, indent=1,
                                                           sort_keys=True, allow_nan=False))
        fsync_dir(path.parent)


def fsync_dir(folder: Path) -> None:
    # makes the rename itself durable; best effort where directories cannot be opened
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


# --- rows ----------------------------------------------------------------------------------------
def write_rows(path: Path, start: int, values: np.ndarray) -> None:
    """Write ``values`` as rows ``start...`` of an existing .npy file, flushed to disk.

    Only these bytes are written (plain file IO, no memory map), so processes on several
    hosts writing disjoint rows do not clobber each other (local or cluster file systems
    with POSIX write semantics). A failed write raises :class:`StoreWriteError`.
    """
    with writing(path, "rows"), open_file(path, "r+b") as handle:
        shape, dtype, fortran, offset = npy_header(handle, path)
        values = np.ascontiguousarray(values, dtype)
        if values.shape[1:] != tuple(shape[1:]) or start < 0 or start + len(values) > shape[0]:
            raise ValueError(f"rows {start}..{start + len(values)} of shape {values.shape[1:]} "
                             f"do not fit {path} of shape {shape}.")
        row = int(np.prod(shape[1:], dtype=np.int64))
        handle.seek(offset + start * row * dtype.itemsize)
        handle.write(memoryview(values.reshape(-1)).cast("B"))
        handle.flush()
        os.fsync(handle.fileno())


class RowArrays(dict):
    """The memory-mapped row arrays of a checkpoint or of its targets, by name
    (``grads``, ``out_to_loss``, ``check``, ``done``); :func:`write_flagged_rows` (through
    :meth:`Store.write_rows`) writes them."""

    forget: Callable[[], None] | None = None  # drops the record of a finished array
    salt: int = 0  # of the row checks (Store.row_salt)


class KeptRows:
    """The row arrays of the last checkpoint (or targets) written, kept open between
    batches. Opening them costs four memory maps and header reads (~5 ms a batch on the
    shared 2 cores); checking that each file is still the one mapped costs a ``stat``
    each. A file replaced, deleted or resized since is opened again (and checked as any
    open is), so a batch never writes to a file that is no longer the store's."""

    def __init__(self):
        self._key, self._arrays, self._files = None, None, None

    @staticmethod
    def _identity(arrays: RowArrays) -> tuple | None:
        try:
            files = [a.filename for a in arrays.values()]
        except AttributeError:  # not memory maps (an object store's arrays): opened anew
            return None
        try:
            return tuple((st.st_dev, st.st_ino, st.st_size) for st in
                         (os.stat(f, follow_symlinks=False) for f in files))
        except OSError:  # gone: opened again, which says what is wrong
            return None

    def get(self, key, open_arrays: Callable[[], RowArrays]) -> RowArrays:
        """The arrays of ``key`` (any hashable), from ``open_arrays()`` when they are not
        the ones kept or their files changed."""
        if key == self._key and self._files is not None \
                and self._identity(self._arrays) == self._files:
            return self._arrays
        self._key = self._arrays = self._files = None  # unmap the old ones first
        arrays = open_arrays()
        self._key, self._arrays, self._files = key, arrays, self._identity(arrays)
        return arrays


CHECKED = ("grads", "out_to_loss")  # the arrays a row check covers, in this order


def write_flagged_rows(arrays: dict[str, np.memmap], rows: np.ndarray,
                       values: dict[str, np.ndarray], flags: np.ndarray) -> None:
    """Write ``values[name][i]`` to row ``rows[i]`` of each memory-mapped array, their
    :func:`row_checks` to ``arrays["check"]``, then the ``flags`` to ``arrays["done"]``.

    Values and checks are flushed before the done flags are set, so a crash leaves a row
    either done with its values on disk, or not done.
    """
    with writing(Path(arrays["done"].filename), "rows"):
        stored = {name: np.asarray(value, arrays[name].dtype) for name, value in values.items()}
        for name, value in stored.items():
            arrays[name][rows] = value
            arrays[name].flush()
        arrays["check"][rows] = row_checks(rows, [stored[n] for n in CHECKED if n in stored],
                                           getattr(arrays, "salt", 0))
        arrays["check"].flush()
        arrays["done"][rows] = flags
        arrays["done"].flush()


# --- creating arrays ---------------------------------------------------------------------------
def reserve(fd: int, size: int) -> None:
    """Allocate the blocks of an open file now, so that a full disk fails here."""
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as err:
        # filesystems without fallocate: the size set by ftruncate must do
        if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise


def _header_bytes(shape: tuple[int, ...], dtype) -> bytes:
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
              "shape": tuple(int(s) for s in shape)}
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, header)
    return buffer.getvalue()


def _check_space(folder: Path, need: int) -> None:
    try:
        info = os.statvfs(folder)
    except OSError:
        return
    free = info.f_bavail * info.f_frsize
    if info.f_blocks and need > free:
        raise OSError(errno.ENOSPC, f"{need} bytes are needed, {free} are free")


def _write_new(path: Path, suffix: str, header: bytes, data: memoryview | None,
               size: int) -> Path:
    """A temp file beside ``path`` holding ``header`` and ``data`` (or zeros up to
    ``size``), its blocks reserved and fsynced; its path."""
    for stale in path.parent.glob(f".{path.name}.*.{suffix}"):
        stale.unlink()  # left by a killed writer; callers hold the lock of ``path``
    _check_space(path.parent, size)
    tmp, fd = _new_temp(path, suffix)
    try:
        with os.fdopen(fd, "wb") as handle:
            os.ftruncate(handle.fileno(), size)
            reserve(handle.fileno(), size)
            handle.write(header)
            if data is not None:
                handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        os.unlink(tmp)
        raise
    return tmp


def stage_array(path: Path, value: np.ndarray) -> tuple[Path, dict[str, Any]]:
    """Write ``value`` as a .npy temp file beside ``path`` (fsynced, blocks reserved first,
    so a full disk fails with ENOSPC before a byte is written); ``(temp path, its
    file_record)``, hashed from the bytes written rather than read back. Rename it over
    ``path`` to finish (:func:`save_array`)."""
    with writing(path, path.name):
        value = np.ascontiguousarray(value)
        header = _header_bytes(value.shape, value.dtype)
        data = memoryview(value.reshape(-1)).cast("B")
        tmp = _write_new(path, "partial", header, data, len(header) + value.nbytes)
        try:
            return tmp, bytes_record([header, data])
        except BaseException:
            os.unlink(tmp)
            raise


def save_array(path: Path, value: np.ndarray) -> dict[str, Any]:
    """Write ``value`` as the .npy file ``path`` atomically (temp file, fsync, rename) and
    return its :func:`file_record`. Call with the lock of whatever ``path`` belongs to."""
    tmp, record = stage_array(path, value)
    try:
        with writing(path, path.name):
            os.replace(tmp, path)
    except BaseException:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        raise
    return record


def create_zeros(path: Path, shape: tuple[int, ...], dtype) -> None:
    """Create ``path`` as a zero .npy array with its blocks reserved, under a temp name
    renamed into place; a full disk fails here (ENOSPC), not as a SIGBUS inside a
    memory-mapped write later. Call with the store's ``create`` lock held."""
    header = _header_bytes(shape, dtype)
    size = len(header) + int(np.prod(shape, dtype=object)) * np.dtype(dtype).itemsize
    tmp = _write_new(path, "tmp", header, None, size)
    try:
        os.replace(tmp, path)
    except BaseException:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        raise
