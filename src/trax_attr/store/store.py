"""The store: one TRAK run's files under ``save_dir``. Only this package touches disk.

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
* A finished array (XᵀX, the inverse, scores) is written under a temp name, fsynced and
  renamed; its size and xxh3_128 digest, and those of the rows it was computed from, are
  recorded in the metadata in the same atomic write that marks it finished, and verified
  whenever it is used. A half-written or altered array is never used.
* Writers take flock(2) locks in ``locks/`` (:mod:`.locks`).
* Nothing is unpickled (``allow_pickle=False``, JSON metadata), every path is built from
  validated names and checked to stay inside ``save_dir`` (symbolic links included).
* A failed write (disk full, read-only or unwritable ``save_dir``) raises
  :class:`StoreWriteError` and leaves what is on disk as it was: readable and resumable.

The layout is in :mod:`.layout`. The :class:`Store` is made of :mod:`.settings_record`
(``store.json``, the settings digest, repair) and :mod:`.experiments` (targets and scores),
over one-file helpers: :mod:`.errors`, :mod:`.reading` (safe opens and reads),
:mod:`.checksums` (records and row checks), :mod:`.writes` (atomic writes), :mod:`.locks`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..hashing import digest
from .checksums import RowStream, read_verified, verify_file
from .errors import StoreBusyError, StoreCorruptedError, StoreWriteError, repair_hint, writing
from .experiments import ExperimentFiles
from .layout import check_model_id, check_name, model_id_of
from .locks import flock
from .reading import open_file, open_memmap, present, read_json, read_rows
from .schema import BOUND, check_model_meta
from .settings_record import SettingsRecord
from .writes import RowArrays, create_zeros, stage_array, write_flagged_rows, write_json_atomic

__all__ = ["Store", "StoreBusyError", "StoreWriteError", "StoreCorruptedError", "RowArrays",
           "check_flags"]

_DONE_CHUNK = 1 << 20      # rows of a done bitmap (1 byte each) read at once


def check_flags(flags: np.ndarray, start: int, where: str, model_id: int, folder: str) -> None:
    """Refuse done flags other than 0, 1 and 2 (rows ``start...``), naming ``where``."""
    if (flags > 2).any():
        raise StoreCorruptedError(
            f"{where!r} holds done flags other than 0, 1 and 2 (e.g. row "
            f"{int(np.argmax(flags > 2)) + start}); it is corrupted. Delete the folder "
            f"{folder!r} and featurize model_id={model_id} again.")


class Store(SettingsRecord, ExperimentFiles):
    """Files of one TRAK run.

    Args:
      root: the folder (``save_dir``); created if absent.
      config: the run's settings (:meth:`trax_attr.Settings.to_config`); an existing store
        must hold the same ones. The keys given when the store is created are its
        settings: their digest (:meth:`trax_attr.Settings.digest`) is stamped on every
        checkpoint and experiment and checked whenever one is read. Keys added later
        (:meth:`check_config`) are what the run learns, such as the feature width.
    """

    def __init__(self, root: str | os.PathLike, config: dict[str, Any]):
        # Several processes (one jax.distributed job, or independent ones) may open one
        # store at once: store.json is created and extended only under the ``meta`` lock,
        # re-read inside it, so no process ever replaces another's settings.
        self.root = Path(root)
        meta_path = self.root / "store.json"
        if present(self.root) and not self.root.is_dir():
            raise ValueError(f"save_dir={str(self.root)!r} is a file, not a folder; pass a "
                             "folder path (it is created if absent).")
        if not present(meta_path):
            with writing(self.root, "the store folder"):
                self.root.mkdir(parents=True, exist_ok=True)
        self._real_root = self.root.resolve()
        if present(meta_path):
            self._read_store_meta()
        else:
            with self.lock("meta", wait=True):
                if present(meta_path):  # another process created it meanwhile
                    self._read_store_meta()
                else:
                    self._refuse_orphans()
                    self.config = json.loads(json.dumps(config))
                    self._keys = sorted(self.config)
                    self.digest = self._digest()
                    self._write_store_meta()
        self.check_config(config)

    # --- locks ---------------------------------------------------------------------------
    def lock(self, name: str, *, shared: bool = False, wait: bool = False, busy: str = "",
             reading: bool = False):
        """Hold the flock(2) lock ``locks/<name>.lock`` (see :func:`.locks.flock`)."""
        return flock(self._inside(self.root / "locks" / f"{name}.lock"), shared=shared,
                     wait=wait, busy=busy, reading=reading)

    def _reading(self):
        # Finished files are renamed into place and recorded inside the exclusive meta
        # lock; a reader reads a record and opens its file inside the shared one, so it
        # sees the old pair or the new one, never a new file with an old record.
        return self.lock("meta", shared=True, wait=True, reading=True)

    # --- configuration -------------------------------------------------------------------

    # --- paths ---------------------------------------------------------------------------
    def _inside(self, path: Path) -> Path:
        """``path`` if it resolves (links followed) inside save_dir; else
        StoreCorruptedError. Files themselves are then opened without following links."""
        root = self._real_root
        resolved = path.resolve()
        if resolved != root and root not in resolved.parents:
            raise StoreCorruptedError(
                f"{str(path)!r} resolves to {str(resolved)!r}, outside save_dir {str(root)!r} "
                "(a symbolic link?). The store only reads and writes inside save_dir: remove "
                "the link."
            )
        return path

    # --- checkpoints ---------------------------------------------------------------------
    def model_dir(self, model_id: int) -> Path:
        return self._inside(self.root / "models" / str(check_model_id(model_id)))

    def model_ids(self) -> list[int]:
        folder = self._inside(self.root / "models")
        if not folder.is_dir():
            return []
        ids = (model_id_of(p.name) for p in folder.iterdir())
        return sorted(i for i in ids if i is not None and present(folder / str(i) / "meta.json"))

    def model_meta(self, model_id: int) -> dict[str, Any] | None:
        """The checked meta of ``model_id``, None if it has none."""
        path = self._inside(self.model_dir(model_id) / "meta.json")
        if not present(path):
            return None
        return check_model_meta(path, read_json(path), self.digest)

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
                meta = {"fingerprint": fingerprint, "finalized": False,
                        "settings": self._stamp()}
                write_json_atomic(self.model_dir(model_id) / "meta.json", meta)
            return meta

    def model_arrays(self, model_id: int, n: int, k: int, mode: str = "r+") -> RowArrays:
        """The row arrays of a checkpoint: grads (n, k) f32, out_to_loss (n,) f32, check
        (n,) u8, done (n,) u1."""
        folder = self.model_dir(model_id)
        self._check_complete(folder / "done.npy", [folder / "grads.npy",
                                                   folder / "out_to_loss.npy",
                                                   folder / "check.npy"])
        arrays = RowArrays(
            grads=self.open_array(folder / "grads.npy", (n, k), np.float32, mode),
            out_to_loss=self.open_array(folder / "out_to_loss.npy", (n,), np.float32, mode),
            check=self.open_array(folder / "check.npy", (n,), np.uint64, mode),
            done=self.open_array(folder / "done.npy", (n,), np.uint8, mode))
        arrays.salt = self.row_salt(model_id)
        return arrays

    def row_salt(self, model_id: int, exp_name: str | None = None) -> int:
        """The salt of the row checks of a checkpoint's training rows (or of its targets in
        ``exp_name``): rows moved to another checkpoint, experiment or store fail them."""
        return int(digest(self.digest, check_model_id(model_id), exp_name)[:16], 16)

    @staticmethod
    def _check_complete(done: Path, values: list[Path]) -> None:
        # done flags without their values would make zeros look finished
        if present(done):
            missing = [p.name for p in values if not present(p)]
            if missing:
                raise StoreCorruptedError(
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

    # --- finished checkpoint arrays --------------------------------------------------------
    def _publish(self, staged: dict[Path, Path], update: Callable[[], None]) -> None:
        """Rename the staged temp files ``{final path: temp path}`` into place and call
        ``update()`` (the metadata write recording them), inside the exclusive meta lock."""
        try:
            with self.lock("meta", wait=True):
                for path, tmp in staged.items():
                    with writing(path, path.name):
                        os.replace(tmp, path)
                update()
        finally:
            for tmp in staged.values():
                if present(tmp):
                    os.unlink(tmp)

    def finish_model(self, model_id: int, arrays: dict[str, np.ndarray],
                     records: dict[str, dict], update: dict[str, Any]) -> None:
        """Write ``arrays`` (e.g. ``{"xtx": ..., "inverse": ...}``) as finished files of
        ``model_id`` and, in one atomic metadata write, their records, the ``records`` of
        the row files they were computed from, and ``update``. Call under the exclusive
        :meth:`model_lock`."""
        folder = self.model_dir(model_id)
        staged, written = {}, {}
        try:
            for name, value in arrays.items():
                path = self._inside(folder / f"{name}.npy")
                staged[path], written[path.name] = stage_array(path, value)
        except BaseException:
            for tmp in staged.values():
                os.unlink(tmp)
            raise

        for key, file in BOUND.items():  # e.g. λ goes into the record of inverse.npy too
            if key in update and file in written:
                written[file] = {**written[file], key: update[key]}

        def record():
            meta = self.model_meta(model_id)
            write_json_atomic(folder / "meta.json", {
                **meta, **update, "arrays": {**meta.get("arrays", {}), **records, **written}})

        self._publish(staged, record)

    def finished(self, model_id: int, name: str, shape: tuple[int, ...], dtype,
                 mode: str = "r") -> np.ndarray:
        """A finished array of a finalized checkpoint, ``shape`` and ``dtype``, verified
        against its record as it is read (a memory map)."""
        path = self._inside(self.model_dir(model_id) / f"{check_name('array', name)}.npy")
        fix = (f"Delete the folder {str(path.parent)!r} and featurize model_id={model_id} "
               "again.")
        with self._reading():
            meta = self.model_meta(model_id)
            if meta is None or not meta["finalized"]:
                raise ValueError(f"model_id={model_id} is not finalized; call "
                                 "finalize_features() first.")
            handle = open_file(path, fix=fix)
        with handle:
            return read_verified(handle, path, meta.get("arrays", {}).get(path.name),
                                 f"{path.name} of model_id={model_id}", fix, shape, dtype)

    def record(self, model_id: int, name: str) -> dict | None:
        """The size and digest recorded for a finished file of ``model_id``, or None."""
        meta = self.model_meta(model_id) or {}
        return meta.get("arrays", {}).get(f"{check_name('array', name)}.npy")

    # --- rows, by checkpoint and name (what the pipeline reads: see .backend) ------------
    def has_rows(self, model_id: int) -> bool:
        """Whether ``model_id`` has row arrays (some rows were featurized)."""
        return present(self.array_path(model_id, "done"))

    def read_rows(self, model_id: int, name: str, start: int, stop: int) -> np.ndarray:
        """Rows ``[start, stop)`` of a checkpoint's array ``name`` (plain file IO)."""
        return read_rows(self.array_path(model_id, name), start, stop)

    def row_stream(self, model_id: int, name: str, shape=None, dtype=None) -> RowStream:
        """The rows of a checkpoint's array ``name`` read in order and hashed as read."""
        return RowStream(self.array_path(model_id, name), shape, dtype)

    def verify_rows(self, model_id: int, name: str, what: str, fix: str) -> None:
        """Check a checkpoint's array ``name`` against its record (StoreCorruptedError)."""
        verify_file(self.array_path(model_id, name), self.record(model_id, name), what, fix)

    def missing_rows(self, model_id: int, n: int) -> tuple[list[int], int]:
        """(first few missing training rows, how many) of a checkpoint, read in chunks."""
        done = self.array_path(model_id, "done")
        if not present(done):
            return list(range(min(n, 8))), n
        first, count = [], 0
        for start in range(0, n, _DONE_CHUNK):
            flags = read_rows(done, start, start + _DONE_CHUNK)
            check_flags(flags, start, str(done), model_id, str(done.parent))
            left = np.flatnonzero(flags == 0)
            count += left.size
            first.extend((left[: 8 - len(first)] + start).tolist())
        return first, count

    def rows_done(self, model_id: int, exp_name: str | None = None) -> np.ndarray:
        """The done flags ``(n,) u1`` of a checkpoint's training rows (or of its target
        rows in ``exp_name``): 0 to do, 1 done, 2 done as a zero row; empty if absent."""
        if exp_name is None:
            path, size = self.model_dir(model_id) / "done.npy", self.train_set_size
        else:
            exp = self.experiment_meta(exp_name)
            size = None if exp is None else exp["num_targets"]
            path = self.experiment_dir(exp_name) / f"{check_model_id(model_id)}_done.npy"
        path = self._inside(path)
        if not present(path):
            return np.zeros(0, np.uint8)
        return np.array(open_memmap(path, "r", None if size is None else (size,), np.uint8))

    # --- arrays --------------------------------------------------------------------------
    def open_array(self, path: Path, shape: tuple[int, ...], dtype,
                   mode: str = "r+") -> np.memmap:
        """Memory-map an array file, creating it (zeros) if absent; checks shape and dtype."""
        path = self._inside(path)
        if not present(path):
            if mode == "r":
                raise StoreCorruptedError(f"{str(path)!r} does not exist. "
                                          + repair_hint(path))
            self._create_array(path, shape, dtype)
        with writing(path, "an array"):
            return open_memmap(path, mode, shape, dtype)

    def _create_array(self, path: Path, shape: tuple[int, ...], dtype) -> None:
        with writing(path, "a new array"):
            path.parent.mkdir(parents=True, exist_ok=True)
            # serialized, so a second process never replaces a file another one already
            # writes rows to
            with self.lock("create", wait=True):
                if not present(path):  # another process may have made it while we waited
                    create_zeros(path, shape, dtype)

    @staticmethod
    def write_rows(arrays: RowArrays, rows: np.ndarray, values: dict[str, np.ndarray],
                   flags: np.ndarray) -> None:
        """Write ``values[name][i]`` to row ``rows[i]`` of each array with their checks,
        then mark the rows done (see :func:`.writes.write_flagged_rows`)."""
        if getattr(arrays, "forget", None) is not None:
            arrays.forget()  # these rows change a finished array: its record goes
        write_flagged_rows(arrays, rows, values, flags)
