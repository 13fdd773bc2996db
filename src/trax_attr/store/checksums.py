"""Checksums of the store's files: whole-file records (size + digest) and per-row checks.

A finished file gets ``{"bytes", "xxh3_128"}`` in its metadata; it is verified as it is
read (:func:`read_verified`, :class:`RowStream`), so the bytes checked are the bytes used.
Rows written long before their array is finished get a 64-bit check each
(:func:`row_checks`).

The digest is xxh3_128 (the xxhash package): 17-46 GB/s against blake2b's 0.3 GB/s on the
shared 2-core machine (``docs/speed.md``), so a finalize step's pass over Φ is no longer
bound by its hash. The records guard against damage (bits flipped, files truncated,
swapped or rewritten), not against someone who rewrites the metadata as well, so a
cryptographic digest bought nothing. Records written before (``{"bytes", "blake2b"}``)
are verified with blake2b.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import xxhash

from .errors import StoreCorruptedError, repair_hint
from .reading import CHUNK_BYTES, check_shape, file_size, npy_header, open_file

__all__ = ["DIGEST", "DIGESTS", "record_digest", "file_record", "bytes_record",
           "handle_record", "verify_file", "read_verified", "load_array", "RowStream", "row_checks",
           "verify_row_checks"]

# the digest of the records written; every one of DIGESTS is verified (16 bytes each)
DIGEST = "xxh3_128"
DIGESTS = {"xxh3_128": xxhash.xxh3_128, "blake2b": lambda: hashlib.blake2b(digest_size=16)}


def record_digest(record) -> str | None:
    """The digest a file record holds (a key of :data:`DIGESTS`), or None if none."""
    if not isinstance(record, dict) or "bytes" not in record:
        return None
    return next((name for name in DIGESTS if name in record), None)


def _hash_handle(handle, limit: int, digest: str = DIGEST) -> tuple[int, str]:
    hasher, size = DIGESTS[digest](), 0
    buffer = memoryview(bytearray(CHUNK_BYTES))
    while size < limit and (count := handle.readinto(buffer[:min(CHUNK_BYTES, limit - size)])):
        hasher.update(buffer[:count])
        size += count
    return size, hasher.hexdigest()


def file_record(path: Path) -> dict[str, Any]:
    """``{"bytes": size, "xxh3_128": hex digest}`` of a file, read in 4 MiB chunks."""
    with open_file(path) as handle:
        size, hexdigest = _hash_handle(handle, file_size(handle))
    return {"bytes": size, DIGEST: hexdigest}


def bytes_record(parts) -> dict[str, Any]:
    """:func:`file_record` of a file holding the byte buffers ``parts``, in order."""
    hasher, size = DIGESTS[DIGEST](), 0
    for part in parts:
        hasher.update(part)
        size += memoryview(part).nbytes
    return {"bytes": size, DIGEST: hasher.hexdigest()}


def _no_record(path: Path, what: str, fix: str) -> StoreCorruptedError:
    return StoreCorruptedError(f"{what} at {str(path)!r} has no size and checksum record in "
                               f"the metadata, so it was never finished. {fix}")


def _mismatch(path: Path, what: str, found, record: dict, fix: str) -> StoreCorruptedError:
    digest = record_digest(record)
    return StoreCorruptedError(f"{what} at {str(path)!r} does not match the checksum recorded "
                               f"when it was finished ({digest} {found} != {record[digest]}): "
                               f"it is corrupted. {fix}")


def _check_size(path: Path, size: int, record: dict, what: str, fix: str) -> None:
    if size != record["bytes"]:
        raise StoreCorruptedError(
            f"{what} at {str(path)!r} holds {size} bytes, {record['bytes']} were recorded when "
            f"it was finished: it is truncated or was replaced. {fix}")


def verify_file(path: Path, record: dict[str, Any] | None, what: str, fix: str) -> None:
    """Check ``path`` against its recorded size and digest; raise StoreCorruptedError if
    it differs."""
    digest = record_digest(record)
    if digest is None:
        raise _no_record(path, what, fix)
    with open_file(path, fix=fix) as handle:
        _check_size(path, file_size(handle), record, what, fix)
        size, found = _hash_handle(handle, record["bytes"], digest)
    if size != record["bytes"] or found != record[digest]:
        raise _mismatch(path, what, found, record, fix)


def handle_record(handle, digest: str = DIGEST) -> dict[str, Any]:
    """:func:`file_record` of an open file (read from its start), with ``digest``."""
    handle.seek(0)
    size, hexdigest = _hash_handle(handle, file_size(handle), digest)
    return {"bytes": size, digest: hexdigest}


def read_verified(handle, path: Path, record: dict[str, Any] | None, what: str, fix: str,
                  shape=None, dtype=None, *, mode: str = "r") -> np.ndarray:
    """The array of the open .npy ``handle``, checked against ``record`` in the same
    read: the bytes hashed are the bytes used (a file replaced meanwhile cannot slip in).

    ``mode="r"``: a read-only memory map; ``"load"``: an in-memory, writable array.
    """
    digest = record_digest(record)
    if digest is None:
        raise _no_record(path, what, fix)
    _check_size(path, file_size(handle), record, what, fix)
    if mode == "load":
        array, found = load_array(handle, path, shape, dtype, fix=fix, digest=digest)
    else:
        found_shape, found_dtype, fortran, offset = npy_header(handle, path, fix)
        check_shape(path, found_shape, found_dtype, shape, dtype, fix)
        found = handle_record(handle, digest)
        array = np.memmap(handle, dtype=found_dtype, mode="r", offset=offset,
                          shape=found_shape, order="F" if fortran else "C")
    if found[digest] != record[digest] or found["bytes"] != record["bytes"]:
        raise _mismatch(path, what, found[digest], record, fix)
    return array


def load_array(handle, path: Path, shape=None, dtype=None, *, fix: str | None = None,
               digest: str = DIGEST) -> tuple[np.ndarray, dict[str, Any]]:
    """``(array, its file record)`` of the open .npy ``handle``, read once into memory
    (its size is its header's, and ``shape``/``dtype`` when given); the record with
    ``digest``."""
    handle.seek(0)
    found_shape, found_dtype, fortran, offset = npy_header(handle, path, fix)
    check_shape(path, found_shape, found_dtype, shape, dtype, fix)
    handle.seek(0)
    raw = bytearray(file_size(handle))
    view = memoryview(raw)
    got = 0
    while got < len(raw) and (count := handle.readinto(view[got:got + CHUNK_BYTES])):
        got += count
    if got != len(raw):
        raise StoreCorruptedError(f"{str(path)!r} ended early; it was truncated while read.")
    hasher = DIGESTS[digest]()
    hasher.update(view)
    record = {"bytes": got, digest: hasher.hexdigest()}
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
            self.shape, self.dtype, fortran, self.offset = npy_header(self._handle, self.path)
            if fortran:
                raise StoreCorruptedError(f"{str(self.path)!r} is stored in Fortran order; "
                                          "rows cannot be streamed. " + repair_hint(self.path))
            check_shape(self.path, self.shape, self.dtype, shape, dtype)
        except BaseException:
            self._handle.close()
            raise
        self._row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        self._handle.seek(0)
        self._hash = DIGESTS[DIGEST]()
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
        """``{"bytes", "xxh3_128"}`` of the whole file (reads the rows not yet read)."""
        while self._next < self.shape[0]:
            self.read(self._next, self._next + max(1, (1 << 22) // max(self._row_bytes, 1)))
        self._handle.close()
        return {"bytes": self.offset + self.shape[0] * self._row_bytes,
                DIGEST: self._hash.hexdigest()}

    def verify(self, record: dict[str, Any] | None, what: str, fix: str) -> None:
        """Raise StoreCorruptedError unless the file matches ``record`` (as
        :func:`verify_file`; a record of another digest, from an older store, costs a
        second pass over the file)."""
        digest = record_digest(record)
        if digest is None:
            raise _no_record(self.path, what, fix)
        found = self.record()
        if digest != DIGEST:
            verify_file(self.path, record, what, fix)
        elif found != {"bytes": record["bytes"], DIGEST: record[DIGEST]}:
            raise _mismatch(self.path, what, found[DIGEST], record, fix)

    def close(self) -> None:
        self._handle.close()


# --- per-row checks of rows being written ------------------------------------------------------
# Rows are written batch by batch long before their array is finished (and gets a record),
# so each row also gets a 64-bit check, written with its values and verified when the
# array is finalized. A sum of every 32-bit word of the row times an odd weight (mod 2^64)
# changes whenever any one word changes, so any damage confined to one word (a flipped bit,
# a rewritten float) is always caught; the row index enters too, so a row never written
# (check 0) or written to another place never passes. Not a defence against a writer who
# recomputes the checks: finished arrays have file records for that.
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
