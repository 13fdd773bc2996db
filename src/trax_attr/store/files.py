"""Files of the store: safe opens, atomic writes, checksums, .npy rows, the store's errors.

Every function here touches one file and nothing else; the :class:`~trax_attr.store.Store`
decides which files exist and when.

Reads go through :func:`open_file`: never through a symbolic link (``O_NOFOLLOW``), only
regular files (a FIFO, a device or a folder in the store's place is refused before it is
read, so none can block or feed endless bytes), JSON at most :data:`JSON_MAX_BYTES`, a
.npy file only when its size is the one its header declares. Writes go through
:func:`writing`, which turns a failed system call into a :class:`StoreWriteError`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from ..hashing import Hasher

__all__ = ["StoreBusyError", "StoreWriteError", "StoreCorruptedError", "JSON_MAX_BYTES",
           "writing", "present", "open_file", "replace_file_atomic", "write_json_atomic",
           "read_json", "read_rows", "write_rows", "file_record", "verify_file", "read_verified",
           "handle_record", "load_array", "stage_array", "save_array", "create_zeros", "write_flagged_rows", "row_checks", "verify_row_checks",
           "RowStream", "rows_layout", "reserve", "read_header", "open_memmap", "fsync_dir",
           "repair_hint"]

JSON_MAX_BYTES = 16 << 20   # metadata is a few KiB; anything this large is not ours
_CHUNK = 1 << 22            # bytes read per step when hashing (4 MiB)


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


# --- opening files ---------------------------------------------------------------------------
def present(path: Path) -> bool:
    """Whether anything (a file, a link, even a dangling one, a FIFO...) is at ``path``."""
    return os.path.lexists(path)


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISDIR, "a folder"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def _refuse(path: Path, kind: str, fix: str | None) -> StoreCorruptedError:
    return StoreCorruptedError(
        f"{str(path)!r} is {kind}, not a regular file: the store reads no file through a link "
        "and no special file. " + (fix or repair_hint(path)))


def _opener(path, flags):
    # O_NONBLOCK: opening a FIFO must not wait for a writer (it is refused right after)
    return os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)


def open_file(path: Path, mode: str = "rb", *, fix: str | None = None) -> BinaryIO:
    """``path`` opened (``"rb"`` or ``"r+b"``) if it is a regular file, not a link.

    Raises :class:`StoreCorruptedError` naming the file and ``fix`` (default
    :func:`repair_hint`) when it is absent, a symbolic link, a FIFO, a device or a folder.
    """
    path = Path(path)
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        raise StoreCorruptedError(f"{str(path)!r} is missing. {fix or repair_hint(path)}"
                                  ) from None
    if not stat.S_ISREG(info.st_mode):
        raise _refuse(path, _kind(info.st_mode), fix)
    try:
        handle = open(path, mode, opener=_opener)
    except OSError as err:
        if err.errno == errno.ELOOP:  # replaced by a link since lstat
            raise _refuse(path, "a symbolic link", fix) from None
        if err.errno == errno.ENOENT:
            raise StoreCorruptedError(f"{str(path)!r} is missing. {fix or repair_hint(path)}"
                                      ) from None
        raise
    mode_now = os.fstat(handle.fileno()).st_mode
    if not stat.S_ISREG(mode_now):
        handle.close()
        raise _refuse(path, _kind(mode_now), fix)
    return handle


def _size(handle) -> int:
    return os.fstat(handle.fileno()).st_size


# --- JSON --------------------------------------------------------------------------------------
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


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def read_json(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``: a regular file of at most :data:`JSON_MAX_BYTES`."""
    with open_file(path) as handle:
        if _size(handle) > JSON_MAX_BYTES:
            raise StoreCorruptedError(
                f"{str(path)!r} holds {_size(handle)} bytes, more than the "
                f"{JSON_MAX_BYTES} any metadata of the store can hold; it is not the "
                "store's. " + repair_hint(path))
        raw = handle.read(JSON_MAX_BYTES + 1)
    try:
        data = json.loads(raw.decode("utf-8"), parse_constant=_no_constant)
    except (ValueError, UnicodeDecodeError, RecursionError) as err:
        raise StoreCorruptedError(
            f"{str(path)!r} is not valid JSON ({str(err)[:200]}); the store's metadata is "
            "corrupted. " + repair_hint(path)
        ) from None
    if not isinstance(data, dict):
        raise StoreCorruptedError(f"{str(path)!r} does not hold a JSON object; the store's "
                                  "metadata is corrupted. " + repair_hint(path))
    return data


# --- .npy headers and rows ---------------------------------------------------------------------
def _header(handle, path: Path, fix: str | None = None
            ) -> tuple[tuple[int, ...], np.dtype, bool, int]:
    """(shape, dtype, fortran_order, data offset) of an open .npy file whose size matches."""
    fix = fix or repair_hint(path)
    try:
        version = np.lib.format.read_magic(handle)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(handle)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(handle)
        else:
            raise ValueError(f"unsupported .npy version {version}")
    except Exception as err:  # numpy's parser of a damaged header raises many kinds
        raise StoreCorruptedError(
            f"{str(path)!r} is not a readable .npy array ({str(err)[:200]}); it is truncated "
            f"or corrupted. {fix}") from None
    offset = handle.tell()
    if dtype.hasobject:
        raise StoreCorruptedError(f"{str(path)!r} is not a readable .npy array: it is not a "
                                  "plain .npy array but holds Python objects, and nothing is "
                                  f"unpickled. {fix}")
    expected = offset + int(np.prod(shape, dtype=object)) * dtype.itemsize
    size = _size(handle)
    if size != expected:
        # np.memmap in r+ mode would silently zero-extend a short file
        raise StoreCorruptedError(
            f"{str(path)!r} is not a readable .npy array (it has {size} bytes where its header "
            f"needs {expected}); it is truncated or corrupted. {fix}")
    return tuple(int(s) for s in shape), dtype, bool(fortran), offset


def read_header(path: Path) -> tuple[tuple[int, ...], np.dtype, bool, int]:
    """(shape, dtype, fortran_order, data offset) of a .npy file whose size matches them."""
    with open_file(path) as handle:
        return _header(handle, path)


def rows_layout(path: Path) -> tuple[int, tuple[int, ...], np.dtype]:
    """(data offset, shape, dtype) of a C-order .npy file whose size matches its header."""
    shape, dtype, fortran, offset = read_header(path)
    if fortran:
        raise StoreCorruptedError(f"{str(path)!r} is stored in Fortran order; rows cannot be "
                                  "streamed. " + repair_hint(path))
    return offset, shape, dtype


def _check_shape(path: Path, shape, dtype, want_shape, want_dtype, fix: str | None = None
                 ) -> None:
    if want_shape is not None and (tuple(shape) != tuple(want_shape)
                                   or np.dtype(dtype) != np.dtype(want_dtype)):
        raise StoreCorruptedError(
            f"{str(path)!r} holds {np.dtype(dtype)}{list(shape)}, expected "
            f"{np.dtype(want_dtype)}{list(want_shape)}; the store was written with other "
            f"settings, or the file was replaced. {fix or repair_hint(path)}")


def read_rows(path: Path, start: int, stop: int) -> np.ndarray:
    """Rows ``[start, stop)`` of a C-order .npy file, read with plain file IO.

    Unlike a memmap, the pages read do not stay in the process's resident memory, so a
    loop over chunks uses memory bounded by the chunk, whatever the file's size.
    """
    with open_file(path) as handle:
        shape, dtype, fortran, offset = _header(handle, path)
        if fortran:
            raise StoreCorruptedError(f"{str(path)!r} is stored in Fortran order. "
                                      + repair_hint(path))
        row = int(np.prod(shape[1:], dtype=np.int64))
        stop = min(stop, shape[0])
        out = np.empty((max(stop - start, 0),) + tuple(shape[1:]), dtype)
        handle.seek(offset + start * row * dtype.itemsize)
        view = memoryview(out.reshape(-1)).cast("B")
        if handle.readinto(view) != len(view):
            raise StoreCorruptedError(f"{str(path)!r} ended early; it was truncated while read.")
    return out


def write_rows(path: Path, start: int, values: np.ndarray) -> None:
    """Write ``values`` as rows ``start...`` of an existing .npy file, flushed to disk.

    Only these bytes are written (plain file IO, no memory map), so processes on several
    hosts writing disjoint rows do not clobber each other (local or cluster file systems
    with POSIX write semantics). A failed write raises :class:`StoreWriteError`.
    """
    with writing(path, "rows"), open_file(path, "r+b") as handle:
        shape, dtype, fortran, offset = _header(handle, path)
        values = np.ascontiguousarray(values, dtype)
        if values.shape[1:] != tuple(shape[1:]) or start < 0 or start + len(values) > shape[0]:
            raise ValueError(f"rows {start}..{start + len(values)} of shape {values.shape[1:]} "
                             f"do not fit {path} of shape {shape}.")
        row = int(np.prod(shape[1:], dtype=np.int64))
        handle.seek(offset + start * row * dtype.itemsize)
        handle.write(memoryview(values.reshape(-1)).cast("B"))
        handle.flush()
        os.fsync(handle.fileno())


def open_memmap(path: Path, mode: str, shape=None, dtype=None) -> np.memmap:
    """Memory-map the .npy file ``path`` (``mode`` "r" or "r+"), refusing links, special
    files, a size other than its header's, and (if given) another shape or dtype."""
    with open_file(path, "rb" if mode == "r" else "r+b") as handle:
        found, found_dtype, fortran, offset = _header(handle, path)
        _check_shape(path, found, found_dtype, shape, dtype)
        try:
            return np.memmap(handle, dtype=found_dtype, mode=mode, offset=offset, shape=found,
                             order="F" if fortran else "C")
        except (ValueError, OverflowError) as err:
            raise StoreCorruptedError(f"{str(path)!r} cannot be mapped ({err}). "
                                      + repair_hint(path)) from None


# --- checksums ---------------------------------------------------------------------------------
def _hash_handle(handle, limit: int) -> tuple[int, str]:
    hasher, size = Hasher(), 0
    buffer = memoryview(bytearray(_CHUNK))
    while size < limit and (count := handle.readinto(buffer[:min(_CHUNK, limit - size)])):
        hasher.update(buffer[:count])
        size += count
    return size, hasher.hexdigest()


def file_record(path: Path) -> dict[str, Any]:
    """``{"bytes": size, "blake2b": hex digest}`` of a file, read in 4 MiB chunks."""
    with open_file(path) as handle:
        size, hexdigest = _hash_handle(handle, _size(handle))
    return {"bytes": size, "blake2b": hexdigest}


def _no_record(path: Path, what: str, fix: str) -> StoreCorruptedError:
    return StoreCorruptedError(f"{what} at {str(path)!r} has no size and checksum record in "
                               f"the metadata, so it was never finished. {fix}")


def _mismatch(path: Path, what: str, found, record, fix: str) -> StoreCorruptedError:
    return StoreCorruptedError(f"{what} at {str(path)!r} does not match the checksum recorded "
                               f"when it was finished (blake2b {found} != {record}): it is "
                               f"corrupted. {fix}")


def _check_size(path: Path, size: int, record: dict, what: str, fix: str) -> None:
    if size != record["bytes"]:
        raise StoreCorruptedError(
            f"{what} at {str(path)!r} holds {size} bytes, {record['bytes']} were recorded when "
            f"it was finished: it is truncated or was replaced. {fix}")


def verify_file(path: Path, record: dict[str, Any] | None, what: str, fix: str) -> None:
    """Check ``path`` against its recorded size and digest; raise StoreCorruptedError if
    it differs."""
    if not isinstance(record, dict) or not {"bytes", "blake2b"} <= set(record):
        raise _no_record(path, what, fix)
    with open_file(path, fix=fix) as handle:
        _check_size(path, _size(handle), record, what, fix)
        size, found = _hash_handle(handle, record["bytes"])
    if size != record["bytes"] or found != record["blake2b"]:
        raise _mismatch(path, what, found, record["blake2b"], fix)


def handle_record(handle) -> dict[str, Any]:
    """:func:`file_record` of an open file (read from its start)."""
    handle.seek(0)
    size, hexdigest = _hash_handle(handle, _size(handle))
    return {"bytes": size, "blake2b": hexdigest}


def read_verified(handle, path: Path, record: dict[str, Any] | None, what: str, fix: str,
                  shape=None, dtype=None, *, mode: str = "r") -> np.ndarray:
    """The array of the open .npy ``handle``, checked against ``record`` in the same
    read: the bytes hashed are the bytes used (a file replaced meanwhile cannot slip in).

    ``mode="r"``: a read-only memory map; ``"load"``: an in-memory, writable array.
    """
    if not isinstance(record, dict) or not {"bytes", "blake2b"} <= set(record):
        raise _no_record(path, what, fix)
    _check_size(path, _size(handle), record, what, fix)
    if mode == "load":
        array, found = load_array(handle, path, shape, dtype, fix=fix)
    else:
        found_shape, found_dtype, fortran, offset = _header(handle, path, fix)
        _check_shape(path, found_shape, found_dtype, shape, dtype, fix)
        found = handle_record(handle)
        array = np.memmap(handle, dtype=found_dtype, mode="r", offset=offset,
                          shape=found_shape, order="F" if fortran else "C")
    if found["blake2b"] != record["blake2b"] or found["bytes"] != record["bytes"]:
        raise _mismatch(path, what, found["blake2b"], record["blake2b"], fix)
    return array


def load_array(handle, path: Path, shape=None, dtype=None, *, fix: str | None = None
               ) -> tuple[np.ndarray, dict[str, Any]]:
    """``(array, its file record)`` of the open .npy ``handle``, read once into memory
    (its size is its header's, and ``shape``/``dtype`` when given)."""
    handle.seek(0)
    found_shape, found_dtype, fortran, offset = _header(handle, path, fix)
    _check_shape(path, found_shape, found_dtype, shape, dtype, fix)
    handle.seek(0)
    raw = bytearray(_size(handle))
    view = memoryview(raw)
    got = 0
    while got < len(raw) and (count := handle.readinto(view[got:got + _CHUNK])):
        got += count
    if got != len(raw):
        raise StoreCorruptedError(f"{str(path)!r} ended early; it was truncated while read.")
    record = {"bytes": got, "blake2b": Hasher().update(view).hexdigest()}
    return np.ndarray(found_shape, found_dtype, buffer=raw, offset=offset,
                      order="F" if fortran else "C"), record


class RowStream:
    """The rows of a C-order .npy file read in order, every byte hashed as it is read.

    A finalize step that reads a whole array once also gets its :meth:`record` (the same
    as :func:`file_record`) or checks it against the one stored (:meth:`verify`) without
    a second pass. Plain file IO: pages read do not stay in the process's memory.
    """

    def __init__(self, path: Path, shape=None, dtype=None):
        self.path = Path(path)
        self._handle = open_file(self.path)
        try:
            self.shape, self.dtype, fortran, self.offset = _header(self._handle, self.path)
            if fortran:
                raise StoreCorruptedError(f"{str(self.path)!r} is stored in Fortran order; "
                                          "rows cannot be streamed. " + repair_hint(self.path))
            _check_shape(self.path, self.shape, self.dtype, shape, dtype)
        except BaseException:
            self._handle.close()
            raise
        self._row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        self._handle.seek(0)
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
            raise StoreCorruptedError(f"{str(self.path)!r} ended early; it was truncated "
                                      "while read.")
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
        """Raise StoreCorruptedError unless the file matches ``record`` (as
        :func:`verify_file`)."""
        if not isinstance(record, dict) or not {"bytes", "blake2b"} <= set(record):
            raise _no_record(self.path, what, fix)
        found = self.record()
        if found != {"bytes": record["bytes"], "blake2b": record["blake2b"]}:
            raise _mismatch(self.path, what, found["blake2b"], record["blake2b"], fix)

    def close(self) -> None:
        self._handle.close()


# --- per-row checks of rows being written ------------------------------------------------------
# Rows are written batch by batch long before their array is finished (and gets a record),
# so each row also gets a 64-bit check, written with its values and verified when the
# array is finalized. A sum of every 32-bit word of the row times an odd weight (mod 2^64)
# changes whenever any one word changes, so any damage confined to one word (a flipped bit,
# a rewritten float) is always caught; the row index enters too, so a row never written
# (check 0) or written to another place never passes. Not a defence against a writer who
# recomputes the checks: finished arrays have blake2b records for that.
_MIX = np.uint64(0x9E3779B97F4A7C15)
_STEP = np.uint64(0x100000001B3)


def row_checks(rows: np.ndarray, values: list[np.ndarray], salt: int = 0) -> np.ndarray:
    """``(R,) u8`` checks of rows ``rows (R,)`` holding ``values`` (each ``(R, ...) f32``,
    the bytes as stored); ``salt`` (:meth:`Store.row_salt`) ties them to one array of one
    store, so rows copied from another checkpoint or experiment fail too."""
    rows = np.asarray(rows, np.uint64)
    check = (rows + np.uint64(1)) * _MIX + np.uint64(salt % 2**64)
    for value in values:
        words = np.ascontiguousarray(value).reshape(len(rows), -1).view(np.uint32)
        weights = (np.arange(words.shape[1], dtype=np.uint64) * np.uint64(2) + np.uint64(1)) * _MIX
        weights |= np.uint64(1)
        check = check * _STEP + (words.astype(np.uint64) * weights).sum(axis=1, dtype=np.uint64)
    return check


def verify_row_checks(start: int, checks: np.ndarray, values: list[np.ndarray], what: str,
                      fix: str, salt: int = 0) -> None:
    """Raise StoreCorruptedError unless rows ``start...`` hold the checks written with them."""
    expected = row_checks(np.arange(start, start + len(checks)), values, salt)
    bad = np.flatnonzero(expected != checks)
    if bad.size:
        raise StoreCorruptedError(
            f"{what}: rows {(bad[:8] + start).tolist()} ({bad.size} in rows {start}.."
            f"{start + len(checks) - 1}) do not match the checks written with them: the values "
            f"or the done flags were altered on disk after they were written. {fix}")


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
    import io

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
    file_record)``. Rename it over ``path`` to finish (:func:`save_array`)."""
    with writing(path, path.name):
        value = np.ascontiguousarray(value)
        header = _header_bytes(value.shape, value.dtype)
        tmp = _write_new(path, "partial", header, memoryview(value.reshape(-1)).cast("B"),
                         len(header) + value.nbytes)
        try:
            return tmp, file_record(tmp)
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
