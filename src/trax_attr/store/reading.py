"""Safe reads of the store's files: nothing through a link, only regular files, bounded sizes.

Reads go through :func:`open_file`: never through a symbolic link (``O_NOFOLLOW``), only
regular files (a FIFO, a device or a folder in the store's place is refused before it is
read, so none can block or feed endless bytes), JSON at most :data:`JSON_MAX_BYTES`, a
.npy file only when its size is the one its header declares (and, where asked, its shape
and dtype the ones expected). Nothing is unpickled.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from .errors import StoreCorruptedError, repair_hint

__all__ = ["JSON_MAX_BYTES", "CHUNK_BYTES", "present", "open_file", "file_size", "read_json",
           "npy_header", "read_header", "rows_layout", "check_shape", "read_rows", "open_memmap"]

JSON_MAX_BYTES = 16 << 20   # metadata is a few KiB; anything this large is not ours
CHUNK_BYTES = 1 << 22       # bytes read per step when hashing or loading (4 MiB)


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


def file_size(handle) -> int:
    return os.fstat(handle.fileno()).st_size


# --- JSON --------------------------------------------------------------------------------------
def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def read_json(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``: a regular file of at most :data:`JSON_MAX_BYTES`."""
    with open_file(path) as handle:
        if file_size(handle) > JSON_MAX_BYTES:
            raise StoreCorruptedError(
                f"{str(path)!r} holds {file_size(handle)} bytes, more than the "
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
def npy_header(handle, path: Path, fix: str | None = None
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
    size = file_size(handle)
    if size != expected:
        # np.memmap in r+ mode would silently zero-extend a short file
        raise StoreCorruptedError(
            f"{str(path)!r} is not a readable .npy array (it has {size} bytes where its header "
            f"needs {expected}); it is truncated or corrupted. {fix}")
    return tuple(int(s) for s in shape), dtype, bool(fortran), offset


def read_header(path: Path) -> tuple[tuple[int, ...], np.dtype, bool, int]:
    """(shape, dtype, fortran_order, data offset) of a .npy file whose size matches them."""
    with open_file(path) as handle:
        return npy_header(handle, path)


def rows_layout(path: Path) -> tuple[int, tuple[int, ...], np.dtype]:
    """(data offset, shape, dtype) of a C-order .npy file whose size matches its header."""
    shape, dtype, fortran, offset = read_header(path)
    if fortran:
        raise StoreCorruptedError(f"{str(path)!r} is stored in Fortran order; rows cannot be "
                                  "streamed. " + repair_hint(path))
    return offset, shape, dtype


def check_shape(path: Path, shape, dtype, want_shape, want_dtype, fix: str | None = None
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
        shape, dtype, fortran, offset = npy_header(handle, path)
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


def open_memmap(path: Path, mode: str, shape=None, dtype=None) -> np.memmap:
    """Memory-map the .npy file ``path`` (``mode`` "r" or "r+"), refusing links, special
    files, a size other than its header's, and (if given) another shape or dtype."""
    with open_file(path, "rb" if mode == "r" else "r+b") as handle:
        found, found_dtype, fortran, offset = npy_header(handle, path)
        check_shape(path, found, found_dtype, shape, dtype)
        try:
            return np.memmap(handle, dtype=found_dtype, mode=mode, offset=offset, shape=found,
                             order="F" if fortran else "C")
        except (ValueError, OverflowError) as err:
            raise StoreCorruptedError(f"{str(path)!r} cannot be mapped ({err}). "
                                      + repair_hint(path)) from None
