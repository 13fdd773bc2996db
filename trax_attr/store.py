"""The on-disk store: versioned layout, atomic metadata, per-row progress, locks.

Layout under ``save_dir`` (format version 1)::

    store.json                          configuration, written once
    locks/                              flock(2) lock files (no content)
    models/<model_id>/meta.json         checkpoint fingerprint, finalized flag, array records
    models/<model_id>/grads.npy         (n_train, k) f32  projected gradients Φ
    models/<model_id>/out_to_loss.npy   (n_train,)   f32  Q
    models/<model_id>/done.npy          (n_train,)   u1   0 to do, 1 done, 2 done as a zero
                                                          row (non-finite values, see TRAKer)
    models/<model_id>/features.npy      (n_train, k) f32  Φ·A, after finalize_features
    experiments/<name>/meta.json        num_targets, model ids scored, scores record
    experiments/<name>/<model_id>_targets.npy  (n_targets, k) f32  φ of the targets
    experiments/<name>/<model_id>_done.npy     (n_targets,)   u1   as done.npy
    experiments/<name>/scores.npy       (n_train, n_targets) f32, after finalize_scores

Rules, and the fault each one answers:

* Every JSON file is replaced atomically (temp file, fsync, rename), and every
  read-modify-write of one happens under an exclusive lock: a crash or a second process
  never leaves a torn or half-updated file.
* A row array is created whole (zeros, blocks reserved with ``posix_fallocate``) under a
  temp name and renamed, under a lock so that two processes cannot both create it. Blocks
  are reserved so that a full disk fails at creation with ENOSPC, not later as a SIGBUS
  inside a memory-mapped write.
* A row is marked done only after its values are flushed, so a kill loses at most the
  batch in flight. Rows go through a shared memory map: on one machine every process sees
  the same page cache, so processes writing disjoint rows, even rows sharing a page, never
  overwrite each other (this does not hold on network filesystems such as NFS).
* A finished array (features, scores) is written under a temp name, fsynced and renamed;
  its size and blake2b digest are recorded in the metadata in the same atomic write that
  marks it finished, and verified whenever it is opened. A half-written or altered array
  is never used. features.npy may be written by several processes of one jax.distributed
  job (each its own rows, with :func:`write_rows`, plain fsynced file writes) into one
  temp file that the job's rank 0, the holder of the exclusive lock, creates and publishes.
* Writers take flock(2) locks in ``locks/``: featurize and score share a lock on their
  checkpoint or experiment; finalize_features and finalize_scores need it exclusively and
  are refused (:class:`StoreBusyError`) while another process writes there.
* Nothing is unpickled (``allow_pickle=False``, JSON metadata), every path is built from
  validated names and checked to stay inside ``save_dir`` (symbolic links included).
* A failed write (disk full, read-only or unwritable ``save_dir``) raises
  :class:`StoreWriteError` and leaves what is on disk as it was: readable and resumable.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["Store", "FORMAT_VERSION", "StoreBusyError", "StoreWriteError", "file_record"]

FORMAT_VERSION = 1
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_HASH_CHUNK = 1 << 22  # bytes hashed per read (4 MiB, one reused buffer)


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
def _writing(path: Path, what: str) -> Iterator[None]:
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
    with _writing(path, "metadata"):
        path.parent.mkdir(parents=True, exist_ok=True)
        for stale in path.parent.glob(f".{path.name}.*.tmp"):
            stale.unlink()  # left by a killed writer; callers hold the meta lock
        replace_file_atomic(path, lambda handle: json.dump(data, handle, indent=1,
                                                           sort_keys=True))
        _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
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
            + _repair_hint(path)
        ) from None
    if not isinstance(data, dict):
        raise ValueError(f"{str(path)!r} does not hold a JSON object; the store's metadata is "
                         "corrupted. " + _repair_hint(path))
    return data


def _repair_hint(path: Path) -> str:
    if path.name == "store.json":
        return "Restore it from a backup, or start a new save_dir."
    return (f"Delete the folder {str(path.parent)!r} to recompute what it held (other "
            "checkpoints and experiments are not affected).")


def _rows_layout(path: Path) -> tuple[int, tuple[int, ...], np.dtype]:
    """(data offset, shape, dtype) of a C-order .npy file whose size matches its header."""
    try:
        shape, dtype, fortran, offset = _read_header(path)
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
    offset, shape, dtype = _rows_layout(path)
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
    offset, shape, dtype = _rows_layout(path)
    values = np.ascontiguousarray(values, dtype)
    if values.shape[1:] != tuple(shape[1:]) or start < 0 or start + len(values) > shape[0]:
        raise ValueError(f"rows {start}..{start + len(values)} of shape {values.shape[1:]} do "
                         f"not fit {path} of shape {shape}.")
    row = int(np.prod(shape[1:], dtype=np.int64))
    with _writing(path, "rows"), open(path, "r+b") as handle:
        handle.seek(offset + start * row * dtype.itemsize)
        handle.write(memoryview(values.reshape(-1)).cast("B"))
        handle.flush()
        os.fsync(handle.fileno())


def file_record(path: Path) -> dict[str, Any]:
    """``{"bytes": size, "blake2b": hex digest}`` of a file, read in 4 MiB chunks."""
    digest = hashlib.blake2b(digest_size=16)
    size = 0
    buffer = memoryview(bytearray(_HASH_CHUNK))  # one buffer for all chunks
    with open(path, "rb") as handle:
        while count := handle.readinto(buffer):
            digest.update(buffer[:count])
            size += count
    return {"bytes": size, "blake2b": digest.hexdigest()}


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


def _reserve(path: Path) -> None:
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


def _read_header(path: Path) -> tuple[tuple[int, ...], np.dtype, bool, int]:
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


def _open_memmap(path: Path, mode: str) -> np.memmap:
    try:
        shape, dtype, fortran, offset = _read_header(path)
        return np.memmap(path, dtype=dtype, mode=mode, offset=offset, shape=shape,
                         order="F" if fortran else "C")
    except (ValueError, OSError, EOFError) as err:
        if isinstance(err, OSError) and err.errno in _WRITE_ERRNOS:
            raise
        raise ValueError(
            f"{str(path)!r} is not a readable .npy array ({err}); it is truncated or corrupted. "
            f"Delete the folder {str(path.parent)!r}: what it held is recomputed on the next call."
        ) from None


class Store:
    """Files of one TRAK run. Only this class touches disk.

    Args:
      root: the folder (``save_dir``); created if absent.
      config: the run's settings; an existing store must hold the same ones.
    """

    def __init__(self, root: str | os.PathLike, config: dict[str, Any]):
        # Several processes (one jax.distributed job, or independent ones) may open one
        # store at once: store.json is created and extended only under the ``meta`` lock,
        # re-read inside it, so no process ever replaces another's settings.
        self.root = Path(root)
        self._real_root = self.root.resolve()
        meta_path = self.root / "store.json"
        if self.root.exists() and not self.root.is_dir():
            raise ValueError(f"save_dir={str(self.root)!r} is a file, not a folder; pass a "
                             "folder path (it is created if absent).")
        if meta_path.exists():
            self.config = self._read_store_meta()
            self.check_config(config)
        else:
            with _writing(self.root, "the store folder"):
                self.root.mkdir(parents=True, exist_ok=True)
            with self.lock("meta", wait=True):
                if meta_path.exists():  # another process created it meanwhile
                    self.config = self._read_store_meta()
                else:
                    self.config = dict(config)
                    self._write_store_meta()
            self.check_config(config)

    # --- locks ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self, name: str, *, shared: bool = False, wait: bool = False,
             busy: str = "") -> Iterator[None]:
        """Hold the flock(2) lock ``locks/<name>.lock`` for the ``with`` block.

        Args:
          name: the resource, e.g. ``"model-0"``, ``"exp-test"``, ``"meta"``.
          shared: many shared holders may coexist; an exclusive holder is alone.
          wait: block until the lock is free; otherwise raise :class:`StoreBusyError`
            with ``busy`` as its message.
        """
        path = self._inside(self.root / "locks" / f"{name}.lock")
        with _writing(path, "a lock file"):
            path.parent.mkdir(exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
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

    # --- configuration -------------------------------------------------------------------
    def _read_store_meta(self) -> dict[str, Any]:
        meta_path = self.root / "store.json"
        meta = read_json(meta_path)
        if meta.get("format") != "trax_attr.store" or meta.get("version") != FORMAT_VERSION:
            raise ValueError(
                f"{str(meta_path)!r} is not a trax_attr store of format version {FORMAT_VERSION} "
                f"(found format={meta.get('format')!r}, version={meta.get('version')!r}). "
                "Use another save_dir."
            )
        if not isinstance(meta.get("config"), dict):
            raise ValueError(f"{str(meta_path)!r} has no 'config' object; the store's metadata "
                             "is corrupted. " + _repair_hint(meta_path))
        return meta["config"]

    def _write_store_meta(self) -> None:
        write_json_atomic(self.root / "store.json", {
            "format": "trax_attr.store", "version": FORMAT_VERSION, "config": self.config})

    def check_config(self, config: dict[str, Any]) -> None:
        """Refuse settings that differ from the stored ones; record new keys."""
        config = json.loads(json.dumps(config))  # compare as stored: tuples become lists

        def diffs():
            return [f"{key}: stored {self.config[key]!r}, given {value!r}"
                    for key, value in config.items()
                    if key in self.config and self.config[key] != value]

        def refuse(found):
            raise ValueError(
                f"save_dir {str(self.root)!r} was written with other settings ("
                + "; ".join(found) + "). Use the stored settings to resume, or another save_dir "
                "for a new run."
            )

        if found := diffs():
            refuse(found)
        if any(key not in self.config for key in config):
            with self.lock("meta", wait=True):
                self.config = self._read_store_meta()
                if found := diffs():
                    refuse(found)
                new = {key: value for key, value in config.items() if key not in self.config}
                if new:
                    self.config.update(new)
                    self._write_store_meta()

    # --- paths ---------------------------------------------------------------------------
    def _inside(self, path: Path) -> Path:
        """``path`` if it resolves (links followed) inside save_dir; else ValueError."""
        root = self._real_root
        resolved = path.resolve()
        if resolved != root and root not in resolved.parents:
            raise ValueError(
                f"{str(path)!r} resolves to {str(resolved)!r}, outside save_dir {str(root)!r} "
                "(a symbolic link?). The store only reads and writes inside save_dir: remove "
                "the link."
            )
        return path

    # --- checkpoints ---------------------------------------------------------------------
    def model_dir(self, model_id: int) -> Path:
        return self._inside(self.root / "models" / str(check_model_id(model_id)))

    def model_ids(self) -> list[int]:
        folder = self.root / "models"
        if not folder.exists():
            return []
        return sorted(int(p.name) for p in folder.iterdir()
                      if p.name.isdigit() and (p / "meta.json").exists())

    def model_meta(self, model_id: int) -> dict[str, Any] | None:
        path = self.model_dir(model_id) / "meta.json"
        if not path.exists():
            return None
        meta = read_json(path)
        if not isinstance(meta.get("fingerprint"), str) or not isinstance(
                meta.get("finalized"), bool):
            raise ValueError(f"{str(path)!r} lacks a string 'fingerprint' or a boolean "
                             "'finalized'; the store's metadata is corrupted. "
                             + _repair_hint(path))
        return meta

    def array_path(self, model_id: int, name: str) -> Path:
        """Path of a checkpoint's array file (``grads``, ``out_to_loss``, ``done``...)."""
        return self._inside(self.model_dir(model_id) / f"{check_name('array', name)}.npy")

    def create_model(self, model_id: int, fingerprint: str) -> dict[str, Any]:
        """The meta of ``model_id``, created for ``fingerprint`` if absent (race-free)."""
        meta = self.model_meta(model_id)
        if meta is not None:  # no lock needed to read: a read-only store can be resumed
            return meta
        with self.lock("meta", wait=True):
            meta = self.model_meta(model_id)
            if meta is None:
                meta = {"fingerprint": fingerprint, "finalized": False}
                write_json_atomic(self.model_dir(model_id) / "meta.json", meta)
            return meta

    def model_arrays(self, model_id: int, n: int, k: int, mode: str = "r+") -> dict[str, np.memmap]:
        """The row arrays of a checkpoint: grads (n, k) f32, out_to_loss (n,) f32, done (n,) u1."""
        folder = self.model_dir(model_id)
        self._check_complete(folder / "done.npy",
                             [folder / "grads.npy", folder / "out_to_loss.npy"])
        return {
            "grads": self.open_array(folder / "grads.npy", (n, k), np.float32, mode),
            "out_to_loss": self.open_array(folder / "out_to_loss.npy", (n,), np.float32, mode),
            "done": self.open_array(folder / "done.npy", (n,), np.uint8, mode),
        }

    @staticmethod
    def _check_complete(done: Path, values: list[Path]) -> None:
        # done flags without their values would make zeros look finished
        if done.exists():
            missing = [p.name for p in values if not p.exists()]
            if missing:
                raise ValueError(
                    f"{str(done)!r} records finished rows but {missing} in the same folder is "
                    f"missing, so those rows are lost. Delete the folder {str(done.parent)!r} "
                    "(or its done file) to recompute them."
                )

    def model_lock(self, model_id: int, *, shared: bool, doing: str):
        """The lock of one checkpoint's rows: shared to featurize, exclusive to finalize."""
        model_id = check_model_id(model_id)
        return self.lock(f"model-{model_id}", shared=shared, busy=(
            f"cannot {doing} model_id={model_id} in {str(self.root)!r}: another process is "
            + ("finalizing it" if shared else "featurizing or finalizing it")
            + f" (it holds locks/model-{model_id}.lock). Wait until that process is done, then "
            "call again; finished rows are kept."))

    def features(self, model_id: int, n: int, k: int) -> np.memmap:
        """The finalized features Φ·A (n, k) f32, verified against their record."""
        return self._finished_model_array(model_id, "features.npy", (n, k))

    def out_to_loss(self, model_id: int, n: int) -> np.memmap:
        """Q (n,) f32 of a finalized checkpoint, verified against its record."""
        return self._finished_model_array(model_id, "out_to_loss.npy", (n,))

    def _finished_model_array(self, model_id: int, name: str, shape) -> np.memmap:
        meta = self.model_meta(model_id)
        path = self.model_dir(model_id) / name
        if meta is None or not meta["finalized"]:
            raise ValueError(f"model_id={model_id} is not finalized; call finalize_features() "
                             "first.")
        verify_file(path, meta.get("arrays", {}).get(name), f"{name} of model_id={model_id}",
                    f"Delete the folder {str(path.parent)!r} and featurize model_id={model_id} "
                    "again.")
        return self.open_array(path, shape, np.float32, "r")

    def features_partial(self, model_id: int) -> Path:
        # One fixed name, not mkstemp: in a multi-process finalize (TRAKer with
        # jax.distributed) every process writes its rows into this file, so they must all
        # find it. Only the holder of the exclusive model lock creates, publishes or removes
        # it, so the fixed name cannot collide.
        return self.model_dir(model_id) / ".features.npy.writing.partial"

    def begin_features(self, model_id: int, n: int, k: int) -> Path:
        """Create the zeroed, block-reserved features file under its temp name; its path.

        Call under :meth:`model_lock` (exclusive). Rows are then written with
        :func:`write_rows` (by any process of the job), and :meth:`publish_features` finishes.
        """
        folder = self.model_dir(model_id)
        tmp = self.features_partial(model_id)
        with _writing(tmp, "features"):
            for stale in folder.glob(".features.npy.*.partial"):
                stale.unlink()  # left by a killed finalize; we hold the exclusive lock
            try:
                np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n, k)).flush()
                _reserve(tmp)
            except BaseException:
                if tmp.exists():
                    tmp.unlink()
                raise
        return tmp

    def discard_features(self, model_id: int) -> None:
        """Remove an unfinished features file (after a failed finalize)."""
        tmp = self.features_partial(model_id)
        if tmp.exists():
            tmp.unlink()

    def publish_features(self, model_id: int) -> None:
        """fsync the features file, record its size and digest (and those of grads and
        out_to_loss), rename it to features.npy and mark the checkpoint finalized, in one
        atomic metadata write. Call under :meth:`model_lock` (exclusive)."""
        folder = self.model_dir(model_id)
        tmp = self.features_partial(model_id)
        final = folder / "features.npy"
        with _writing(final, "features"):
            try:
                with open(tmp, "rb+") as handle:
                    os.fsync(handle.fileno())
                records = {"features.npy": file_record(tmp),
                           "grads.npy": file_record(folder / "grads.npy"),
                           "out_to_loss.npy": file_record(folder / "out_to_loss.npy")}
                os.replace(tmp, final)
            except BaseException:
                if tmp.exists():
                    tmp.unlink()
                raise
        with self.lock("meta", wait=True):
            meta = self.model_meta(model_id)
            write_json_atomic(folder / "meta.json",
                              {**meta, "finalized": True, "arrays": records})

    # --- arrays --------------------------------------------------------------------------
    def open_array(self, path: Path, shape: tuple[int, ...], dtype,
                   mode: str = "r+") -> np.memmap:
        """Memory-map an array file, creating it (zeros) if absent; checks shape and dtype."""
        path = self._inside(path)
        if not path.exists():
            if mode == "r":
                raise FileNotFoundError(f"{str(path)!r} does not exist.")
            self._create_array(path, shape, dtype)
        with _writing(path, "an array"):
            array = _open_memmap(path, mode)
        if array.shape != tuple(shape) or array.dtype != np.dtype(dtype):
            raise ValueError(
                f"{str(path)!r} holds {array.dtype}{list(array.shape)}, expected "
                f"{np.dtype(dtype)}{list(shape)}; the store was written with other settings. "
                "Use another save_dir."
            )
        return array

    def _create_array(self, path: Path, shape: tuple[int, ...], dtype) -> None:
        with _writing(path, "a new array"):
            path.parent.mkdir(parents=True, exist_ok=True)
            with self.lock("create", wait=True):
                if path.exists():  # another process made it while we waited
                    return
                for stale in path.parent.glob(f".{path.name}.*.tmp"):
                    stale.unlink()
                # Creation is serialized by the ``create`` lock (so a second process never
                # replaces a file another one already writes rows to). The temp name is
                # per process but not from mkstemp, whose 0600 mode would stay on the file
                # and lock out the other users of a shared store.
                tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
                try:
                    array = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=shape)
                    array.flush()
                    del array
                    _reserve(Path(tmp))
                    os.replace(tmp, path)
                except BaseException:
                    if os.path.exists(tmp):
                        os.unlink(tmp)
                    raise

    @staticmethod
    def write_rows(arrays: dict[str, np.memmap], rows: np.ndarray, values: dict[str, np.ndarray],
                   flags: np.ndarray) -> None:
        """Write ``values[name][i]`` to row ``rows[i]`` of each array, then mark the rows done.

        Values are flushed before the done flags are set, so a crash leaves a row either
        done with its values on disk, or not done.
        """
        with _writing(Path(arrays["done"].filename), "rows"):
            for name, value in values.items():
                arrays[name][rows] = value
                arrays[name].flush()
            arrays["done"][rows] = flags
            arrays["done"].flush()

    # --- experiments ---------------------------------------------------------------------
    def experiment_dir(self, name: str) -> Path:
        return self._inside(self.root / "experiments" / check_name("exp_name", name))

    def experiment_names(self) -> list[str]:
        folder = self.root / "experiments"
        if not folder.exists():
            return []
        return sorted(p.name for p in folder.iterdir() if (p / "meta.json").exists())

    def experiment_meta(self, name: str) -> dict[str, Any] | None:
        path = self.experiment_dir(name) / "meta.json"
        if not path.exists():
            return None
        meta = read_json(path)
        ids = meta.get("model_ids")
        if (not isinstance(meta.get("num_targets"), int) or not isinstance(ids, list)
                or not all(isinstance(i, int) for i in ids)):
            raise ValueError(f"{str(path)!r} lacks an integer 'num_targets' or a list of integer "
                             "'model_ids'; the store's metadata is corrupted. "
                             + _repair_hint(path))
        return meta

    def update_experiment_meta(self, name: str,
                               update: Callable[[dict[str, Any] | None], dict[str, Any]]
                               ) -> dict[str, Any]:
        """Replace the meta of ``name`` by ``update(current or None)``, under the meta lock."""
        with self.lock("meta", wait=True):
            meta = update(self.experiment_meta(name))
            write_json_atomic(self.experiment_dir(name) / "meta.json", meta)
            return meta

    def experiment_lock(self, name: str, *, shared: bool, doing: str):
        """The lock of one experiment: shared to score, exclusive to finalize_scores."""
        return self.lock(f"exp-{check_name('exp_name', name)}", shared=shared, busy=(
            f"cannot {doing} experiment {name!r} in {str(self.root)!r}: another process is "
            + ("finalizing its scores" if shared else "scoring or finalizing it")
            + f" (it holds locks/exp-{name}.lock). Wait until that process is done, then call "
            "again; finished rows are kept."))

    def target_arrays(self, name: str, model_id: int, m: int, k: int,
                      mode: str = "r+") -> dict[str, np.memmap]:
        folder = self.experiment_dir(name)
        model_id = check_model_id(model_id)
        self._check_complete(folder / f"{model_id}_done.npy", [folder / f"{model_id}_targets.npy"])
        return {
            "grads": self.open_array(folder / f"{model_id}_targets.npy", (m, k), np.float32, mode),
            "done": self.open_array(folder / f"{model_id}_done.npy", (m,), np.uint8, mode),
        }

    def save_scores(self, name: str, scores: np.ndarray, model_ids: list[int]) -> Path:
        """Write scores.npy atomically and record its digest and the checkpoints used."""
        folder = self.experiment_dir(name)
        path = folder / "scores.npy"
        with _writing(path, "scores"):
            for stale in folder.glob(".scores.npy.*.partial"):
                stale.unlink()  # left by a killed finalize_scores; callers hold the exp lock
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=".scores.npy.", suffix=".partial")
            try:
                with os.fdopen(fd, "wb") as handle:
                    np.save(handle, scores, allow_pickle=False)
                    handle.flush()
                    os.fsync(handle.fileno())
                record = file_record(Path(tmp))
                os.replace(tmp, path)
            except BaseException:
                if os.path.exists(tmp):
                    os.unlink(tmp)
                raise
        self.update_experiment_meta(name, lambda meta: {
            **meta, "scores": {**record, "model_ids": list(model_ids)}})
        return path

    def load_scores(self, name: str) -> np.ndarray:
        """The finished scores (n_train, n_targets) f32 of ``name``, verified."""
        meta = self.experiment_meta(name)
        if meta is None:
            raise ValueError(f"experiment {name!r} does not exist in {str(self.root)!r} "
                             f"(existing: {self.experiment_names()}).")
        path = self.experiment_dir(name) / "scores.npy"
        verify_file(path, meta.get("scores"), f"scores of experiment {name!r}",
                    f"Call finalize_scores(exp_name={name!r}) again to recompute them.")
        try:
            return np.load(path, allow_pickle=False)
        except ValueError as err:
            raise ValueError(f"{str(path)!r} is not a plain .npy array ({err}); nothing is "
                             "unpickled.") from None


def check_name(kind: str, name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name) or ".." in name:
        raise ValueError(
            f"{kind}={name!r} is not a valid name: use 1 to 128 letters, digits, '_', '-' and "
            "'.', starting with a letter or digit and without '..' (it becomes a folder inside "
            "save_dir)."
        )
    return name


def check_model_id(model_id) -> int:
    if isinstance(model_id, bool) or not isinstance(model_id, (int, np.integer)) or model_id < 0:
        raise ValueError(f"model_id must be a non-negative integer, got {model_id!r}; number "
                         "checkpoints 0, 1, 2, ...")
    return int(model_id)
