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

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .files import (StoreBusyError, StoreWriteError, create_zeros, open_memmap, read_json,
                    repair_hint, save_array, verify_file, write_flagged_rows,
                    write_json_atomic, writing)
from .layout import FORMAT_VERSION, check_model_id, check_name
from .locks import flock

__all__ = ["Store", "StoreBusyError", "StoreWriteError"]


class Store:
    """Files of one TRAK run.

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
            with writing(self.root, "the store folder"):
                self.root.mkdir(parents=True, exist_ok=True)
            with self.lock("meta", wait=True):
                if meta_path.exists():  # another process created it meanwhile
                    self.config = self._read_store_meta()
                else:
                    self.config = dict(config)
                    self._write_store_meta()
            self.check_config(config)

    # --- locks ---------------------------------------------------------------------------
    def lock(self, name: str, *, shared: bool = False, wait: bool = False, busy: str = ""):
        """Hold the flock(2) lock ``locks/<name>.lock`` (see :func:`.locks.flock`)."""
        return flock(self._inside(self.root / "locks" / f"{name}.lock"), shared=shared,
                     wait=wait, busy=busy)

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
                             "is corrupted. " + repair_hint(meta_path))
        return meta["config"]

    def _write_store_meta(self) -> None:
        write_json_atomic(self.root / "store.json", {
            "format": "trax_attr.store", "version": FORMAT_VERSION, "config": self.config})

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
                             + repair_hint(path))
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

    # --- finished checkpoint arrays --------------------------------------------------------
    def finish_model(self, model_id: int, arrays: dict[str, np.ndarray],
                     records: dict[str, dict], update: dict[str, Any]) -> None:
        """Write ``arrays`` (e.g. ``{"xtx": ..., "inverse": ...}``) as finished files of
        ``model_id`` and, in one atomic metadata write, their records, the ``records`` of
        the row files they were computed from, and ``update``. Call under the exclusive
        :meth:`model_lock`."""
        folder = self.model_dir(model_id)
        written = {f"{name}.npy": self._save_array(folder / f"{name}.npy", value)
                   for name, value in arrays.items()}
        with self.lock("meta", wait=True):
            meta = self.model_meta(model_id)
            write_json_atomic(folder / "meta.json", {
                **meta, **update, "arrays": {**meta.get("arrays", {}), **records, **written}})

    def finished(self, model_id: int, name: str, shape: tuple[int, ...], dtype,
                 mode: str = "r") -> np.ndarray:
        """A finished array of a finalized checkpoint, verified against its record."""
        meta = self.model_meta(model_id)
        path = self.model_dir(model_id) / f"{check_name('array', name)}.npy"
        if meta is None or not meta["finalized"]:
            raise ValueError(f"model_id={model_id} is not finalized; call finalize_features() "
                             "first.")
        verify_file(path, meta.get("arrays", {}).get(path.name), f"{path.name} of "
                    f"model_id={model_id}", f"Delete the folder {str(path.parent)!r} and "
                    f"featurize model_id={model_id} again.")
        return self.open_array(path, shape, dtype, mode)

    def record(self, model_id: int, name: str) -> dict | None:
        """The size and digest recorded for a finished file of ``model_id``, or None."""
        meta = self.model_meta(model_id) or {}
        return meta.get("arrays", {}).get(f"{check_name('array', name)}.npy")

    def _save_array(self, path: Path, value: np.ndarray) -> dict[str, Any]:
        """Write ``value`` to ``path`` atomically; its record."""
        return save_array(self._inside(path), value)

    def rows_done(self, model_id: int, exp_name: str | None = None) -> np.ndarray:
        """The done flags ``(n,) u1`` of a checkpoint's training rows (or of its target
        rows in ``exp_name``): 0 to do, 1 done, 2 done as a zero row; empty if absent."""
        if exp_name is None:
            path = self.model_dir(model_id) / "done.npy"
        else:
            path = self.experiment_dir(exp_name) / f"{check_model_id(model_id)}_done.npy"
        path = self._inside(path)
        if not path.exists():
            return np.zeros(0, np.uint8)
        return np.array(open_memmap(path, "r"))

    # --- arrays --------------------------------------------------------------------------
    def open_array(self, path: Path, shape: tuple[int, ...], dtype,
                   mode: str = "r+") -> np.memmap:
        """Memory-map an array file, creating it (zeros) if absent; checks shape and dtype."""
        path = self._inside(path)
        if not path.exists():
            if mode == "r":
                raise FileNotFoundError(f"{str(path)!r} does not exist.")
            self._create_array(path, shape, dtype)
        with writing(path, "an array"):
            array = open_memmap(path, mode)
        if array.shape != tuple(shape) or array.dtype != np.dtype(dtype):
            raise ValueError(
                f"{str(path)!r} holds {array.dtype}{list(array.shape)}, expected "
                f"{np.dtype(dtype)}{list(shape)}; the store was written with other settings. "
                "Use another save_dir."
            )
        return array

    def _create_array(self, path: Path, shape: tuple[int, ...], dtype) -> None:
        with writing(path, "a new array"):
            path.parent.mkdir(parents=True, exist_ok=True)
            # serialized, so a second process never replaces a file another one already
            # writes rows to
            with self.lock("create", wait=True):
                if not path.exists():  # another process may have made it while we waited
                    create_zeros(path, shape, dtype)

    @staticmethod
    def write_rows(arrays: dict[str, np.memmap], rows: np.ndarray, values: dict[str, np.ndarray],
                   flags: np.ndarray) -> None:
        """Write ``values[name][i]`` to row ``rows[i]`` of each array, then mark the rows
        done (see :func:`.files.write_flagged_rows`)."""
        write_flagged_rows(arrays, rows, values, flags)

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
                             + repair_hint(path))
        return meta

    def update_experiment_meta(self, name: str,
                               update: Callable[[dict[str, Any] | None], dict[str, Any]]
                               ) -> dict[str, Any]:
        """Replace the meta of ``name`` by ``update(current or None)``, under the meta lock."""
        with self.lock("meta", wait=True):
            meta = update(self.experiment_meta(name))
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
                      mode: str = "r+") -> dict[str, np.memmap]:
        folder = self.experiment_dir(name)
        model_id = check_model_id(model_id)
        self._check_complete(folder / f"{model_id}_done.npy", [folder / f"{model_id}_targets.npy"])
        return {
            "grads": self.open_array(folder / f"{model_id}_targets.npy", (m, k), np.float32, mode),
            "done": self.open_array(folder / f"{model_id}_done.npy", (m,), np.uint8, mode),
        }

    def experiment_rows(self, name: str, model_id: int, k: int) -> dict[str, np.memmap]:
        """The target arrays of ``model_id`` in experiment ``name``, read-only."""
        exp = self.experiment_meta(name)
        if exp is None:
            raise ValueError(f"exp_name={name!r} is not an experiment of this store; call "
                             "start_scoring_checkpoint first.")
        return self.target_arrays(name, model_id, exp["num_targets"], k, mode="r")

    def save_scores(self, name: str, scores: np.ndarray, info: dict[str, Any]) -> Path:
        """Write scores.npy atomically and record its digest and ``info`` (the checkpoints
        and λ used). Call under the exclusive :meth:`experiment_lock`."""
        path = self.experiment_dir(name) / "scores.npy"
        record = self._save_array(path, np.asarray(scores, np.float32))
        self.update_experiment_meta(name, lambda meta: {**meta, "scores": {**record, **info}})
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





def _differences(name: str, stored, given) -> list[str]:
    """``"name: stored x, given y"`` for each differing entry, nested dicts by their keys."""
    if stored == given:
        return []
    if isinstance(stored, dict) and isinstance(given, dict):
        return [line for key in sorted(set(stored) | set(given))
                for line in _differences(f"{name}.{key}", stored.get(key), given.get(key))]
    return [f"{name}: stored {stored!r}, given {given!r}"]
