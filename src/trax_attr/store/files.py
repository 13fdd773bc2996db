"""Files of the store: atomic writes, checksums, .npy rows, the store's errors.

Every function here touches one file and nothing else; the :class:`~trax_attr.store.Store`
decides which files exist and when.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ..hashing import Hasher, file_digest

__all__ = ["StoreBusyError", "StoreWriteError", "writing", "replace_file_atomic",
           "write_json_atomic", "read_json", "read_rows", "write_rows", "file_record",
           "verify_file", "save_array", "create_zeros", "write_flagged_rows", "RowStream", "rows_layout", "reserve", "read_header", "open_memmap", "fsync_dir",
           "repair_hint"]


class StoreBusyError(RuntimeError):
    """Another process holds a lock that this operation needs; retry when it is done."""


class StoreWriteError(OSError):
    """A write to the store failed (disk full, read-only or unwritable save_dir).

    ``errno`` is that of the failed system call; what was on disk before is unchanged.
    """


_WRITE_ERRNOS = {errno.ENOSPC: "the device is full", errno.EDQUOT: "the disk quota is exceeded",
                 errno.EROFS: "the filesystem is read-only",
                 errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
                 errno.EFBIG: "the file is too large for this filesystem",
                 errno.ENOTDIR: "a parent of save_dir is a file, not a folder"}


@contextlib.contextmanager
def writing(path: Path, what: str) -> Iterator[None]:
    """Turn an OSError of a write into a StoreWriteError that says what to do."""
    try:
        yield
    except StoreWriteError:
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


def replace_file_atomic(path: Path, write: Callable[[Any], None], *, binary: bool = False) -> None:
    """Replace ``path`` by what ``write(handle)`` writes, atomically: readers see the old
    file or the new one (temp file in the same folder, fsync, rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb" if binary else "w") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
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
                                                           sort_keys=True))
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


def read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path) as handle:
            data = json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(
            f"{str(path)!r} is not valid JSON ({err}); the store's metadata is corrupted. "
            + repair_hint(path)
        ) from None
    if not isinstance(data, dict):
        raise ValueError(f"{str(path)!r} does not hold a JSON object; the store's metadata is "
                         "corrupted. " + repair_hint(path))
    return data


def repair_hint(path: Path) -> str:
    if path.name == "store.json":
        return "Restore it from a backup, or start a new save_dir."
    return (f"Delete the folder {str(path.parent)!r} to recompute what it held (other "
            "checkpoints and experiments are not affected).")


def rows_layout(path: Path) -> tuple[int, tuple[int, ...], np.dtype]:
    """(data offset, shape, dtype) of a C-order .npy file whose size matches its header."""
    try:
        shape, dtype, fortran, offset = read_header(path)
    except (ValueError, EOFError) as err:
        raise ValueError(f"{str(path)!r} is not a readable .npy array ({err}); it is truncated "
                         "or corrupted.") from None
    if fortran:
        raise ValueError(f"{path} is stored in Fortran order; rows cannot be streamed.")
    return offset, shape, dtype


def read_rows(path: Path, start: int, stop: int) -> np.ndarray:
    """Rows ``[start, stop)`` of a C-order .npy file, read with plain file IO.

    Unlike a memmap, the pages read do not stay in the process's resident memory, so a
    loop over chunks uses memory bounded by the chunk, whatever the file's size.
    """
    offset, shape, dtype = rows_layout(path)
    row = int(np.prod(shape[1:], dtype=np.int64))
    stop = min(stop, shape[0])
    out = np.empty((max(stop - start, 0),) + tuple(shape[1:]), dtype)
    with open(path, "rb") as handle:
        handle.seek(offset + start * row * dtype.itemsize)
        handle.readinto(memoryview(out.reshape(-1)).cast("B"))
    return out


def write_rows(path: Path, start: int, values: np.ndarray) -> None:
    """Write ``values`` as rows ``start...`` of an existing .npy file, flushed to disk.

    Only these bytes are written (plain file IO, no memory map), so processes on several
    hosts writing disjoint rows do not clobber each other (local or cluster file systems
    with POSIX write semantics). A failed write raises :class:`StoreWriteError`.
    """
    offset, shape, dtype = rows_layout(path)
    values = np.ascontiguousarray(values, dtype)
    if values.shape[1:] != tuple(shape[1:]) or start < 0 or start + len(values) > shape[0]:
        raise ValueError(f"rows {start}..{start + len(values)} of shape {values.shape[1:]} do "
                         f"not fit {path} of shape {shape}.")
    row = int(np.prod(shape[1:], dtype=np.int64))
    with writing(path, "rows"), open(path, "r+b") as handle:
        handle.seek(offset + start * row * dtype.itemsize)
        handle.write(memoryview(values.reshape(-1)).cast("B"))
        handle.flush()
        os.fsync(handle.fileno())


def file_record(path: Path) -> dict[str, Any]:
    """``{"bytes": size, "blake2b": hex digest}`` of a file, read in 4 MiB chunks."""
    size, hexdigest = file_digest(path)
    return {"bytes": size, "blake2b": hexdigest}


class RowStream:
    """The rows of a C-order .npy file read in order, every byte hashed as it is read.

    A finalize step that reads a whole array once also gets its :meth:`record` (the same
    as :func:`file_record`) or checks it against the one stored (:meth:`verify`) without
    a second pass. Plain file IO: pages read do not stay in the process's memory.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.offset, self.shape, self.dtype = rows_layout(self.path)
        self._row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        self._handle = open(self.path, "rb")
        self._hash = Hasher()
        self._hash.update(self._handle.read(self.offset))
        self._next = 0

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows ``[start, stop)``; ``start`` must be where the previous read stopped."""
        if start != self._next:
            raise ValueError(f"rows of {self.path} must be streamed in order: asked for "
                             f"{start} after {self._next}.")
        stop = min(stop, self.shape[0])
        out = np.empty((max(stop - start, 0),) + tuple(self.shape[1:]), self.dtype)
        view = memoryview(out.reshape(-1)).cast("B")
        if self._handle.readinto(view) != len(view):
            raise ValueError(f"{str(self.path)!r} ended early; it was truncated while read.")
        self._hash.update(view)
        self._next = stop
        return out

    def record(self) -> dict[str, Any]:
        """``{"bytes", "blake2b"}`` of the whole file (reads the rows not yet read)."""
        while self._next < self.shape[0]:
            self.read(self._next, self._next + max(1, (1 << 22) // max(self._row_bytes, 1)))
        self._handle.close()
        return {"bytes": self.offset + self.shape[0] * self._row_bytes,
                "blake2b": self._hash.hexdigest()}

    def verify(self, record: dict[str, Any] | None, what: str, fix: str) -> None:
        """Raise ValueError unless the file matches ``record`` (as :func:`verify_file`)."""
        if not isinstance(record, dict) or not {"bytes", "blake2b"} <= set(record):
            raise ValueError(f"{what} at {str(self.path)!r} has no size and checksum record "
                             f"in the metadata, so it was never finished. {fix}")
        found = self.record()
        if found != {"bytes": record["bytes"], "blake2b": record["blake2b"]}:
            raise ValueError(f"{what} at {str(self.path)!r} does not match the checksum "
                             f"recorded when it was finished ({found['blake2b']} != "
                             f"{record['blake2b']}): it is corrupted. {fix}")

    def close(self) -> None:
        self._handle.close()


def verify_file(path: Path, record: dict[str, Any] | None, what: str, fix: str) -> None:
    """Check ``path`` against its recorded size and digest; raise ValueError if it differs."""
    if not isinstance(record, dict) or not {"bytes", "blake2b"} <= set(record):
        raise ValueError(f"{what} at {str(path)!r} has no size and checksum record in the "
                         f"metadata, so it was never finished. {fix}")
    if not path.exists():
        raise ValueError(f"{what} at {str(path)!r} is missing. {fix}")
    size = path.stat().st_size
    if size != record["bytes"]:
        raise ValueError(f"{what} at {str(path)!r} holds {size} bytes, {record['bytes']} were "
                         f"recorded when it was finished: it is truncated or was replaced. {fix}")
    found = file_record(path)["blake2b"]
    if found != record["blake2b"]:
        raise ValueError(f"{what} at {str(path)!r} does not match the checksum recorded when it "
                         f"was finished (blake2b {found} != {record['blake2b']}): it is "
                         f"corrupted. {fix}")


def reserve(path: Path) -> None:
    """Allocate the blocks of an existing file now, so that a full disk fails here."""
    fd = os.open(path, os.O_RDWR)
    try:
        size = os.fstat(fd).st_size
        try:
            os.posix_fallocate(fd, 0, size)
        except OSError as err:
            # filesystems without fallocate: writing the last byte at least sizes the file
            if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise
    finally:
        os.close(fd)


def read_header(path: Path) -> tuple[tuple[int, ...], np.dtype, bool, int]:
    """(shape, dtype, fortran_order, data offset) of a .npy file whose size matches them."""
    with open(path, "rb") as handle:
        version = np.lib.format.read_magic(handle)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(handle)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(handle)
        else:
            raise ValueError(f"unsupported .npy version {version}")
        offset = handle.tell()
    if dtype.hasobject:
        raise ValueError("it holds Python objects, which are never unpickled")
    expected = offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    size = path.stat().st_size
    if size != expected:
        # np.memmap in r+ mode would silently zero-extend a short file
        raise ValueError(f"it has {size} bytes where its header needs {expected}")
    return shape, dtype, fortran, offset


def open_memmap(path: Path, mode: str) -> np.memmap:
    try:
        shape, dtype, fortran, offset = read_header(path)
        return np.memmap(path, dtype=dtype, mode=mode, offset=offset, shape=shape,
                         order="F" if fortran else "C")
    except (ValueError, OSError, EOFError) as err:
        if isinstance(err, OSError) and err.errno in _WRITE_ERRNOS:
            raise
        raise ValueError(
            f"{str(path)!r} is not a readable .npy array ({err}); it is truncated or corrupted. "
            f"Delete the folder {str(path.parent)!r}: what it held is recomputed on the next call."
        ) from None


def _temp_name(path: Path, suffix: str) -> Path:
    # not mkstemp: its mode 0600 would stay on the file and lock the other users of a
    # shared store out; os.open with 0o666 honours the umask as every other file does
    return path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.{suffix}")


def save_array(path: Path, value: np.ndarray) -> dict[str, Any]:
    """Write ``value`` as the .npy file ``path`` atomically (temp file, fsync, rename) and
    return its :func:`file_record`. Call with the lock of whatever ``path`` belongs to."""
    with writing(path, path.name):
        for stale in path.parent.glob(f".{path.name}.*.partial"):
            stale.unlink()  # left by a killed writer; callers hold the exclusive lock
        tmp = _temp_name(path, "partial")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o666)
        try:
            with os.fdopen(fd, "wb") as handle:
                np.save(handle, np.ascontiguousarray(value), allow_pickle=False)
                handle.flush()
                os.fsync(handle.fileno())
            record = file_record(tmp)
            os.replace(tmp, path)
        except BaseException:
            if tmp.exists():
                tmp.unlink()
            raise
    return record


def create_zeros(path: Path, shape: tuple[int, ...], dtype) -> None:
    """Create ``path`` as a zero .npy array with its blocks reserved (:func:`reserve`),
    under a temp name renamed into place. Call with the store's ``create`` lock held."""
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        stale.unlink()
    tmp = _temp_name(path, "tmp")
    try:
        array = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=shape)
        array.flush()
        del array
        reserve(tmp)
        os.replace(tmp, path)
    except BaseException:
        if tmp.exists():
            tmp.unlink()
        raise


def write_flagged_rows(arrays: dict[str, np.memmap], rows: np.ndarray,
                       values: dict[str, np.ndarray], flags: np.ndarray) -> None:
    """Write ``values[name][i]`` to row ``rows[i]`` of each memory-mapped array, then the
    ``flags`` to ``arrays["done"]``.

    Values are flushed before the done flags are set, so a crash leaves a row either done
    with its values on disk, or not done.
    """
    with writing(Path(arrays["done"].filename), "rows"):
        for name, value in values.items():
            arrays[name][rows] = value
            arrays[name].flush()
        arrays["done"][rows] = flags
        arrays["done"].flush()
