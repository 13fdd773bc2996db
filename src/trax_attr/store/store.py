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
  renamed; its size and blake2b digest, and those of the rows it was computed from, are
  recorded in the metadata in the same atomic write that marks it finished, and verified
  whenever it is used. A half-written or altered array is never used.
* Writers take flock(2) locks in ``locks/`` (:mod:`.locks`).
* Nothing is unpickled (``allow_pickle=False``, JSON metadata), every path is built from
  validated names and checked to stay inside ``save_dir`` (symbolic links included).
* A failed write (disk full, read-only or unwritable ``save_dir``) raises
  :class:`StoreWriteError` and leaves what is on disk as it was: readable and resumable.

The layout is in :mod:`.layout`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..hashing import digest
from ..settings import Settings
from .files import (StoreBusyError, StoreCorruptedError, StoreWriteError, create_zeros,
                    load_array, open_file, open_memmap, present, read_json, read_verified, repair_hint,
                    stage_array, verify_row_checks, write_flagged_rows, write_json_atomic,
                    writing)
from .layout import FORMAT_VERSION, check_model_id, check_name, model_id_of
from .locks import flock
from .schema import check_experiment_meta, check_model_meta, check_store_meta

__all__ = ["Store", "StoreBusyError", "StoreWriteError", "StoreCorruptedError", "RowArrays"]

_SETTINGS = tuple(f.name for f in dataclasses.fields(Settings))


class RowArrays(dict):
    """The memory-mapped row arrays of a checkpoint or of its targets, by name
    (``grads``, ``out_to_loss``, ``check``, ``done``); :meth:`Store.write_rows` writes them."""

    forget: Callable[[], None] | None = None  # drops the record of a finished array
    salt: int = 0  # of the row checks (Store.row_salt)


class Store:
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
    def _digest(self) -> str:
        return digest({key: self.config[key] for key in self._keys})

    def _read_store_meta(self) -> None:
        path = self.root / "store.json"
        meta = check_store_meta(path, read_json(self._inside(path)), FORMAT_VERSION)
        self.config, self._keys = meta["config"], sorted(meta["settings"]["keys"])
        self.digest = self._digest()
        if self.digest != meta["settings"]["digest"]:
            raise StoreCorruptedError(
                f"the settings in {str(path)!r} were changed after it was written (their "
                f"digest is {self.digest}, {meta['settings']['digest']} was recorded): the "
                "arrays of this store were computed with other settings. Restore store.json "
                "from a backup (or from the save_dir this one was copied from).")
        if set(_SETTINGS) <= set(self.config):
            try:
                Settings(**{key: self.config[key] for key in _SETTINGS})
            except (TypeError, ValueError) as err:
                raise StoreCorruptedError(f"{str(path)!r} holds invalid settings ({err}). "
                                          + repair_hint(path)) from None

    def _write_store_meta(self) -> None:
        write_json_atomic(self.root / "store.json", {
            "format": "trax_attr.store", "version": FORMAT_VERSION, "config": self.config,
            "settings": {"keys": self._keys, "digest": self.digest}})

    def _refuse_orphans(self) -> None:
        held = [name for name in ("models", "experiments") if present(self.root / name)]
        if held:
            raise StoreCorruptedError(
                f"save_dir {str(self.root)!r} holds {' and '.join(f'{h}/' for h in held)} but "
                "no store.json: it was deleted or lost in a copy, so the settings its arrays "
                "were computed with are unknown, and going on with other settings would give "
                "wrong scores. Restore store.json from a backup (or from the save_dir this one "
                f"was copied from), or run `trax-attr repair {self.root}` to rewrite it from "
                "the settings every checkpoint recorded; or use another save_dir.")

    @property
    def train_set_size(self) -> int | None:
        """n, where the settings hold it (checked when store.json is read)."""
        n = self.config.get("train_set_size")
        return n if isinstance(n, int) and not isinstance(n, bool) else None

    def _stamp(self) -> dict[str, Any]:
        """What every checkpoint and experiment records of the settings it was made with."""
        return {"digest": self.digest, "values": {key: self.config[key] for key in self._keys}}

    def check_config(self, config: dict[str, Any]) -> None:
        """Refuse settings that differ from the stored ones; record new keys."""
        config = json.loads(json.dumps(config))  # compare as stored: tuples become lists

        def diffs():
            return [line for key, value in config.items() if key in self.config
                    for line in _differences(key, self.config[key], value)]

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
                self._read_store_meta()
                if found := diffs():
                    refuse(found)
                new = {key: value for key, value in config.items() if key not in self.config}
                if new:
                    self.config.update(new)
                    self._write_store_meta()

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
        then mark the rows done (see :func:`.files.write_flagged_rows`)."""
        if getattr(arrays, "forget", None) is not None:
            arrays.forget()  # these rows change a finished array: its record goes
        write_flagged_rows(arrays, rows, values, flags)

    # --- experiments ---------------------------------------------------------------------
    def experiment_dir(self, name: str) -> Path:
        return self._inside(self.root / "experiments" / check_name("exp_name", name))

    def experiment_names(self) -> list[str]:
        folder = self._inside(self.root / "experiments")
        if not folder.is_dir():
            return []
        names = []
        for p in folder.iterdir():
            try:
                check_name("exp_name", p.name)
            except ValueError:
                continue  # not a folder of ours
            if present(p / "meta.json"):
                names.append(p.name)
        return sorted(names)

    def experiment_meta(self, name: str) -> dict[str, Any] | None:
        """The checked meta of experiment ``name``, None if it has none."""
        path = self._inside(self.experiment_dir(name) / "meta.json")
        if not present(path):
            return None
        return check_experiment_meta(path, read_json(path), self.digest)

    def update_experiment_meta(self, name: str,
                               update: Callable[[dict[str, Any] | None], dict[str, Any]]
                               ) -> dict[str, Any]:
        """Replace the meta of ``name`` by ``update(current or None)``, under the meta lock."""
        with self.lock("meta", wait=True):
            return self._update_experiment_meta(name, update)

    def _update_experiment_meta(self, name, update):  # the caller holds the meta lock
        meta = {**update(self.experiment_meta(name)), "settings": self._stamp()}
        write_json_atomic(self.experiment_dir(name) / "meta.json", meta)
        return meta

    def add_to_experiment(self, name: str, model_id: int, num_targets: int) -> dict[str, Any]:
        """Record that ``model_id`` scores the ``num_targets`` targets of experiment
        ``name`` (created if absent); refuses another target count."""
        def add(exp):
            if exp is None:
                exp = {"num_targets": int(num_targets), "model_ids": []}
            elif exp["num_targets"] != num_targets:
                raise ValueError(
                    f"experiment {name!r} has num_targets={exp['num_targets']}, got "
                    f"{num_targets}; use a new exp_name for another target set.")
            if model_id not in exp["model_ids"]:
                exp = {**exp, "model_ids": sorted(exp["model_ids"] + [int(model_id)])}
            return exp

        return self.update_experiment_meta(name, add)

    def experiment_lock(self, name: str, *, shared: bool, doing: str):
        """The lock of one experiment: shared to score, exclusive to finalize_scores."""
        return self.lock(f"exp-{check_name('exp_name', name)}", shared=shared, busy=(
            f"cannot {doing} experiment {name!r} in {str(self.root)!r}: another process is "
            + ("finalizing its scores" if shared else "scoring or finalizing it")
            + f" (it holds locks/exp-{name}.lock). Wait until that process is done, then call "
            "again; finished rows are kept."))

    def target_arrays(self, name: str, model_id: int, m: int, k: int,
                      mode: str = "r+") -> RowArrays:
        """The target rows of ``model_id`` in experiment ``name``: grads (m, k) f32, check
        (m,) u8, done (m,) u1."""
        folder = self.experiment_dir(name)
        model_id = check_model_id(model_id)
        self._check_complete(folder / f"{model_id}_done.npy",
                             [folder / f"{model_id}_targets.npy", folder / f"{model_id}_check.npy"])
        arrays = RowArrays(
            grads=self.open_array(folder / f"{model_id}_targets.npy", (m, k), np.float32, mode),
            check=self.open_array(folder / f"{model_id}_check.npy", (m,), np.uint64, mode),
            done=self.open_array(folder / f"{model_id}_done.npy", (m,), np.uint8, mode))
        arrays.forget = lambda: self._forget(name, f"{model_id}_targets.npy")
        arrays.salt = self.row_salt(model_id, name)
        return arrays

    def _forget(self, name: str, file: str) -> None:
        if file in (self.experiment_meta(name) or {}).get("arrays", {}):
            self.update_experiment_meta(name, lambda meta: {
                **meta, "arrays": {k: v for k, v in meta.get("arrays", {}).items() if k != file}})

    def check_listed(self, name: str, meta: dict[str, Any]) -> None:
        """Refuse target files of checkpoints that the experiment's meta does not list (the
        list was edited): finalize_scores would silently leave them out."""
        folder = self.experiment_dir(name)
        found = set()
        for p in folder.iterdir():
            head, _, tail = p.name.partition("_")
            if tail in ("targets.npy", "done.npy", "check.npy") and model_id_of(head) is not None:
                found.add(int(head))
        stray = sorted(found - set(meta["model_ids"]))
        if stray:
            raise StoreCorruptedError(
                f"{str(folder)!r} holds target rows of model_ids {stray} that its meta.json "
                f"does not list ({meta['model_ids']}): the metadata was edited or replaced. "
                "Restore it, or delete the files of those checkpoints in that folder (their "
                "targets are scored again by start_scoring_checkpoint and score).")

    def experiment_rows(self, name: str, model_id: int, k: int) -> RowArrays:
        """The target arrays of ``model_id`` in experiment ``name``, read-only."""
        exp = self.experiment_meta(name)
        if exp is None:
            raise ValueError(f"exp_name={name!r} is not an experiment of this store; call "
                             "start_scoring_checkpoint first.")
        return self.target_arrays(name, model_id, exp["num_targets"], k, mode="r")

    def finished_targets(self, name: str, model_id: int, m: int, k: int
                         ) -> tuple[np.ndarray, dict[str, Any]]:
        """``(targets (m, k) f32, record)`` of ``model_id`` in experiment ``name``: checked
        against the record made when the experiment was first scored with them, or, the
        first time, against their row checks (and then recorded: :meth:`finish_targets`).
        Call under the exclusive :meth:`experiment_lock`."""
        folder = self.experiment_dir(name)
        file = f"{check_model_id(model_id)}_targets.npy"
        path = self._inside(folder / file)
        fix = (f"Delete {str(path)!r} and {str(folder / f'{model_id}_done.npy')!r}, then score "
               f"model_id={model_id} in experiment {name!r} again.")
        record = (self.experiment_meta(name) or {}).get("arrays", {}).get(file)
        what = f"the targets of model_id={model_id} in experiment {name!r}"
        self.target_arrays(name, model_id, m, k, mode="r")  # all there, shapes right
        with open_file(path, fix=fix) as handle:
            if record is not None:
                return read_verified(handle, path, record, what, fix, (m, k), np.float32,
                                     mode="load"), record
            targets, found = load_array(handle, path, (m, k), np.float32, fix=fix)
        checks = open_memmap(self._inside(folder / f"{model_id}_check.npy"), "r", (m,),
                             np.uint64)
        verify_row_checks(0, np.asarray(checks), [targets], what, fix,
                          self.row_salt(model_id, name))
        return targets, found

    def finish_targets(self, name: str, records: dict[int, dict[str, Any]]) -> None:
        """Record the target arrays ``{model_id: record}`` of ``name`` as finished (a
        metadata write only where a record is new)."""
        named = {f"{i}_targets.npy": record for i, record in records.items()}
        held = (self.experiment_meta(name) or {}).get("arrays", {})
        if any(held.get(file) != record for file, record in named.items()):
            self.update_experiment_meta(name, lambda meta: {
                **meta, "arrays": {**meta.get("arrays", {}), **named}})

    def save_scores(self, name: str, scores: np.ndarray, info: dict[str, Any]) -> Path:
        """Write scores.npy atomically and record its digest and ``info`` (the checkpoints
        and λ used). Call under the exclusive :meth:`experiment_lock`."""
        path = self._inside(self.experiment_dir(name) / "scores.npy")
        tmp, record = stage_array(path, np.asarray(scores, np.float32))
        self._publish({path: tmp}, lambda: self._update_experiment_meta(
            name, lambda meta: {**meta, "scores": {**record, **info}}))
        return path

    def load_scores(self, name: str) -> np.ndarray:
        """The finished scores (n_train, n_targets) f32 of ``name``, verified as read."""
        path = self._inside(self.experiment_dir(name) / "scores.npy")
        fix = f"Call finalize_scores(exp_name={name!r}) again to recompute them."
        with self._reading():
            meta = self.experiment_meta(name)
            if meta is None:
                raise ValueError(f"experiment {name!r} does not exist in {str(self.root)!r} "
                                 f"(existing: {self.experiment_names()}).")
            record = meta.get("scores")
            if record is None:
                raise ValueError(f"experiment {name!r} has no scores yet; call "
                                 f"finalize_scores(exp_name={name!r}) first.")
            handle = open_file(path, fix=fix)
        n = self.train_set_size
        with handle:
            return read_verified(handle, path, record, f"scores of experiment {name!r}", fix,
                                 None if n is None else (n, meta["num_targets"]), np.float32,
                                 mode="load")

    # --- repair --------------------------------------------------------------------------
    @classmethod
    def repair(cls, root: str | os.PathLike) -> str:
        """Rewrite a lost ``store.json`` from the settings every checkpoint and experiment
        of ``root`` recorded (they must all agree); what was done, in a sentence."""
        root = Path(root)
        if present(root / "store.json"):
            raise ValueError(f"{str(root / 'store.json')!r} exists; there is nothing to "
                             "repair (delete it first only if you know it is wrong).")
        stamps, widths = {}, set()
        for kind in ("models", "experiments"):
            folder = root / kind
            for sub in sorted(folder.iterdir()) if folder.is_dir() else []:
                path = sub / "meta.json"
                if not present(path):
                    continue
                stamp = read_json(path).get("settings")
                values = stamp.get("values") if isinstance(stamp, dict) else None
                if not isinstance(values, dict) or digest(values) != stamp.get("digest"):
                    raise StoreCorruptedError(f"{str(path)!r} holds no settings record that "
                                              "matches its digest; it cannot vouch for the "
                                              "settings. " + repair_hint(path))
                stamps[str(path)] = (stamp["digest"], values)
                if kind == "models" and present(sub / "grads.npy"):
                    widths.add(open_memmap(sub / "grads.npy", "r").shape[1:])
        if not stamps:
            raise ValueError(f"{str(root)!r} holds no checkpoint or experiment metadata to "
                             "rebuild store.json from; use another save_dir.")
        digests = {d for d, _ in stamps.values()}
        if len(digests) > 1 or len(widths) > 1:
            raise StoreCorruptedError(
                f"the checkpoints and experiments of {str(root)!r} were written with different "
                f"settings ({sorted(digests)}) or feature widths ({sorted(widths)}); "
                "store.json cannot be rebuilt. Restore it from a backup.")
        values = next(iter(stamps.values()))[1]
        config = dict(values)
        if widths and "feature_dim" not in config:
            config["feature_dim"] = int(next(iter(widths))[0])
        store = cls.__new__(cls)
        store.root, store._real_root = root, root.resolve()
        store.config, store._keys = config, sorted(values)
        store.digest = store._digest()
        with store.lock("meta", wait=True):
            store._write_store_meta()
        return (f"rewrote {str(root / 'store.json')!r} from the settings recorded by "
                f"{len(stamps)} checkpoints and experiments (digest {store.digest}).")


def _differences(name: str, stored, given) -> list[str]:
    """``"name: stored x, given y"`` for each differing entry, nested dicts by their keys."""
    if stored == given:
        return []
    if isinstance(stored, dict) and isinstance(given, dict):
        return [line for key in sorted(set(stored) | set(given))
                for line in _differences(f"{name}.{key}", stored.get(key), given.get(key))]
    return [f"{name}: stored {stored!r}, given {given!r}"]
