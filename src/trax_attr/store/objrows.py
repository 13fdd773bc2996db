"""Row arrays of a URL store: zarr v3 arrays chunked by whole rows, written values first.

A chunk holds ``chunk`` whole rows (a power of two dividing
:data:`~trax_attr.parallel.hosts.ROW_BLOCK`, at most 8 MiB), so the rows of
:func:`~trax_attr.parallel.process_rows` of different processes lie in different chunks:
no two hosts ever write one object. A batch's values and row checks are written (and
their PUTs completed) before its done flags, so a killed process leaves a row done with
its values stored, or not done. A finished array (XᵀX, the inverse, the scores) is
written whole under a key named after its digest and then recorded in the metadata
(:func:`save_finished`): a reader meets the old record with the old array or the new
with the new, and every byte is hashed as it is read (:class:`RowReader`,
:func:`load_finished`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..hashing import Hasher
from .checksums import row_checks
from .errors import StoreCorruptedError, StoreWriteError
from .objects import Objects
from .writes import CHECKED, RowArrays

__all__ = ["chunk_rows", "ObjectRows", "ObjectRowArrays", "RowReader", "write_object_rows",
           "save_finished", "finished_key", "load_finished"]

_CHUNK_BYTES = 8 << 20
_MAX_CHUNK_ROWS = 256  # = parallel.hosts.ROW_BLOCK (not imported: store/ stays below parallel/)


def chunk_rows(row_bytes: int) -> int:
    """Rows per chunk: the largest power of two ≤ 256 whose chunk is ≤ 8 MiB (≥ 1)."""
    rows = _MAX_CHUNK_ROWS
    while rows > 1 and rows * row_bytes > _CHUNK_BYTES:
        rows //= 2
    return rows


class ObjectRows:
    """One stored array of rows ``shape`` (``(n, ...)``), read by row range, written by
    row numbers; ``np.asarray`` reads it whole."""

    def __init__(self, objects: Objects, key: str, shape: tuple[int, ...], dtype, *,
                 create: bool, fill_missing: bool = False):
        self.objects, self.key = objects, key
        self.shape, self.dtype = tuple(int(s) for s in shape), np.dtype(dtype)
        self.row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        self.chunk = chunk_rows(self.row_bytes)
        self._array = objects.array(key, self.shape, self.dtype, self.chunk, create=create,
                                    fill_missing=fill_missing)

    @property
    def url(self) -> str:
        return self.objects.where(self.key)

    def __len__(self) -> int:
        return self.shape[0]

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows ``[start, stop)`` (clipped to the array)."""
        stop = min(stop, self.shape[0])
        if stop <= start:
            return np.zeros((0,) + self.shape[1:], self.dtype)
        try:
            return np.asarray(self._array[start:stop].read().result(), self.dtype)
        except ValueError as err:
            raise self.objects.corrupted(self.key, err) from None

    def __array__(self, dtype=None, copy=None):
        whole = self.read(0, self.shape[0])
        return whole if dtype is None else whole.astype(dtype)

    def write(self, rows: np.ndarray, values: np.ndarray):
        """Start writing ``values[i]`` to row ``rows[i]``; a future (``.result()``)."""
        rows = np.asarray(rows, np.int64)
        values = np.ascontiguousarray(values, self.dtype)
        if rows.size and rows[-1] - rows[0] == rows.size - 1 and (np.diff(rows) == 1).all():
            return self._array[int(rows[0]):int(rows[-1]) + 1].write(values)  # a range: faster
        return self._array[rows].write(values)

    def wait(self, future) -> None:
        try:
            future.result()
        except ValueError as err:
            raise StoreWriteError(None, f"could not write rows of {self.url!r}: {err}. Rows "
                                  "not marked done are written again when the same batch is "
                                  "featurized again.") from None


class ObjectRowArrays(RowArrays):
    """The row arrays of a checkpoint or of its targets: ``grads``, ``out_to_loss``,
    ``check`` as :class:`ObjectRows`, ``done`` as this process's copy ``(n,) u1`` of the
    stored flags (kept current by :func:`write_object_rows`)."""

    rows: dict[str, ObjectRows]
    owned: range | None = None  # the rows this process may write (several processes)
    what: str = ""


def write_object_rows(arrays: ObjectRowArrays, rows: np.ndarray,
                      values: dict[str, np.ndarray], flags: np.ndarray) -> None:
    """Write ``values[name][i]`` to row ``rows[i]`` with their row checks, wait for
    every PUT, then write the done ``flags``."""
    rows = np.asarray(rows, np.int64)
    if arrays.owned is not None and rows.size and (
            rows.min() < arrays.owned.start or rows.max() >= arrays.owned.stop):
        owned = arrays.owned
        raise ValueError(
            f"{arrays.what}: this process may write rows [{owned.start}, {owned.stop}) only "
            f"(trax_attr.parallel.process_rows), got rows {rows[(rows < owned.start) | (rows >= owned.stop)][:8].tolist()}: "
            "in a job of several processes writing one object store, rows of one chunk "
            "must come from one process. Featurize the rows of "
            "trax_attr.parallel.process_rows(n) in each process.")
    stored = {name: np.asarray(value, arrays.rows[name].dtype) for name, value in values.items()}
    pending = [(arrays.rows[name], arrays.rows[name].write(rows, value))
               for name, value in stored.items()]
    checks = row_checks(rows, [stored[n] for n in CHECKED if n in stored], arrays.salt)
    pending.append((arrays.rows["check"], arrays.rows["check"].write(rows, checks)))
    for array, future in pending:
        array.wait(future)
    done = arrays.rows["done"]
    done.wait(done.write(rows, flags))
    arrays["done"][rows] = flags


class RowReader:
    """The rows of an :class:`ObjectRows` read in order, every byte hashed as read: the
    object store's :class:`~trax_attr.store.checksums.RowStream`."""

    def __init__(self, rows: ObjectRows):
        self.rows, self.shape, self.dtype = rows, rows.shape, rows.dtype
        self._hash, self._next = Hasher(), 0

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows ``[start, stop)``; ``start`` must be where the previous read stopped."""
        if start != self._next:
            raise ValueError(f"rows of {self.rows.url} must be streamed in order: asked for "
                             f"{start} after {self._next}.")
        out = self.rows.read(start, stop)
        self._hash.update(memoryview(np.ascontiguousarray(out).reshape(-1)).cast("B"))
        self._next = start + len(out)
        return out

    def record(self) -> dict[str, Any]:
        """``{"bytes", "blake2b"}`` of the whole array's C-order bytes."""
        step = max(1, self.rows.chunk * max(1, (4 << 20) // max(1, self.rows.chunk
                                                                 * self.rows.row_bytes)))
        while self._next < self.shape[0]:
            self.read(self._next, self._next + step)
        return {"bytes": self.shape[0] * self.rows.row_bytes,
                "blake2b": self._hash.hexdigest()}

    def verify(self, record: dict[str, Any] | None, what: str, fix: str) -> None:
        """Raise StoreCorruptedError unless the array matches ``record``."""
        if not isinstance(record, dict) or "blake2b" not in record:
            raise StoreCorruptedError(f"{what} at {self.rows.url!r} has no checksum record in "
                                      f"the metadata, so it was never finished. {fix}")
        found = self.record()
        if found["blake2b"] != record["blake2b"] or found["bytes"] != record["bytes"]:
            raise StoreCorruptedError(
                f"{what} at {self.rows.url!r} does not match the checksum recorded when it "
                f"was finished (blake2b {found['blake2b']} != {record['blake2b']}): it is "
                f"corrupted. {fix}")

    def close(self) -> None:
        pass


def array_record(value: np.ndarray) -> dict[str, Any]:
    """``{"bytes", "blake2b"}`` of an array's C-order bytes."""
    raw = memoryview(np.ascontiguousarray(value).reshape(-1)).cast("B")
    return {"bytes": len(raw), "blake2b": Hasher().update(raw).hexdigest()}


def finished_key(base: str, record: dict[str, Any]) -> str:
    """The key of the finished array ``base`` whose record is ``record``."""
    return f"{base}.{record['blake2b'][:16]}"


def save_finished(objects: Objects, base: str, value: np.ndarray) -> dict[str, Any]:
    """Write ``value`` whole under a new key named after its digest; its record."""
    value = np.ascontiguousarray(value)
    if value.ndim == 0:
        raise ValueError("finished arrays have at least one axis")
    record = array_record(value)
    rows = ObjectRows(objects, finished_key(base, record), value.shape, value.dtype, create=True)
    rows.wait(rows._array.write(value))
    return record


def load_finished(objects: Objects, base: str, record: dict[str, Any] | None, shape, dtype,
                  what: str, fix: str) -> np.ndarray:
    """The finished array ``base`` in memory, checked against ``record`` as it is read."""
    if not isinstance(record, dict) or "blake2b" not in record:
        raise StoreCorruptedError(f"{what} at {objects.where(base)!r} has no checksum record "
                                  f"in the metadata, so it was never finished. {fix}")
    key = finished_key(base, record)
    try:
        rows = ObjectRows(objects, key, shape, dtype, create=False)
    except StoreCorruptedError as err:
        raise StoreCorruptedError(f"{what}: {err} {fix}") from None
    value = rows.read(0, rows.shape[0])
    found = array_record(value)
    if found != {"bytes": record["bytes"], "blake2b": record["blake2b"]}:
        raise StoreCorruptedError(
            f"{what} at {objects.where(key)!r} does not match the checksum recorded when it "
            f"was finished (blake2b {found['blake2b']} != {record['blake2b']}): it is "
            f"corrupted. {fix}")
    return value
