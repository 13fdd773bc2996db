"""What the TRAKer workflow needs of a store, and :func:`open_store`, which picks one.

Two backends implement :class:`StoreBackend`:

* :class:`~trax_attr.store.Store`: a local (or POSIX shared) folder: memory-mapped .npy
  files, flock(2) locks, fsync'd atomic renames (``save_dir="./trak"``);
* :class:`~trax_attr.store.objstore.ObjectStore`: a URL (``memory://``, ``file://``,
  ``s3://``, ``gs://``): zarr v3 arrays through tensorstore, chunks of whole rows (one
  writer per chunk), JSON records written by process 0, a job id instead of locks.

traker.py, pipeline.py, batches.py and streams.py use only the methods below, so they
never ask which backend they hold.
"""

from __future__ import annotations

import os
from contextlib import AbstractContextManager
from typing import Any, Protocol

import numpy as np

from .objects import is_url

__all__ = ["StoreBackend", "RowSource", "open_store", "is_url"]


class RowSource(Protocol):
    """The rows of one stored array read in order, every byte hashed as it is read."""

    shape: tuple[int, ...]

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows ``[start, stop)``, ``start`` where the previous read stopped."""

    def record(self) -> dict[str, Any]:
        """``{"bytes", "blake2b"}`` of the whole array (reads what is left)."""

    def verify(self, record: dict[str, Any] | None, what: str, fix: str) -> None:
        """StoreCorruptedError (naming ``what`` and ``fix``) unless it matches ``record``."""

    def close(self) -> None: ...


class StoreBackend(Protocol):
    """A TRAK run's store (see :mod:`trax_attr.store.layout` for what it holds).

    Row arrays: a checkpoint's ``grads (n, k) f32``, ``out_to_loss (n,) f32``, ``check (n,)
    u8``, ``done (n,) u1``; an experiment's targets. Finished arrays: ``xtx``, ``inverse``,
    ``scores``, each recorded (size and blake2b) in the same metadata write that marks it
    finished and verified whenever it is used. Errors: :class:`StoreCorruptedError`
    (naming the file or object), :class:`StoreWriteError`, :class:`StoreBusyError`.
    """

    root: Any           # save_dir: a Path, or the store's URL
    config: dict[str, Any]
    digest: str

    # settings
    def check_config(self, config: dict[str, Any]) -> None: ...
    @property
    def train_set_size(self) -> int | None: ...

    # checkpoints
    def model_ids(self) -> list[int]: ...
    def model_meta(self, model_id: int) -> dict[str, Any] | None: ...
    def model_dir(self, model_id: int) -> Any: ...
    def create_model(self, model_id: int, fingerprint: str) -> dict[str, Any]: ...
    def model_lock(self, model_id: int, *, shared: bool,
                   doing: str) -> AbstractContextManager: ...
    def model_arrays(self, model_id: int, n: int, k: int, mode: str = "r+") -> dict: ...
    def write_rows(self, arrays: dict, rows: np.ndarray, values: dict[str, np.ndarray],
                   flags: np.ndarray) -> None: ...
    def rows_done(self, model_id: int, exp_name: str | None = None) -> np.ndarray: ...
    def row_salt(self, model_id: int, exp_name: str | None = None) -> int: ...

    # what the finalize steps read, by checkpoint and array name
    def has_rows(self, model_id: int) -> bool: ...
    def missing_rows(self, model_id: int, n: int) -> tuple[list[int], int]: ...
    def read_rows(self, model_id: int, name: str, start: int, stop: int) -> np.ndarray: ...
    def row_stream(self, model_id: int, name: str, shape=None, dtype=None) -> RowSource: ...
    def verify_rows(self, model_id: int, name: str, what: str, fix: str) -> None: ...
    def record(self, model_id: int, name: str) -> dict | None: ...
    def finished(self, model_id: int, name: str, shape, dtype, mode: str = "r"): ...
    def finish_model(self, model_id: int, arrays: dict[str, np.ndarray],
                     records: dict[str, dict], update: dict[str, Any]) -> None: ...

    # experiments
    def experiment_names(self) -> list[str]: ...
    def experiment_meta(self, name: str) -> dict[str, Any] | None: ...
    def add_to_experiment(self, name: str, model_id: int, num_targets: int) -> dict: ...
    def experiment_lock(self, name: str, *, shared: bool,
                        doing: str) -> AbstractContextManager: ...
    def target_arrays(self, name: str, model_id: int, m: int, k: int,
                      mode: str = "r+") -> dict: ...
    def experiment_rows(self, name: str, model_id: int, k: int) -> dict: ...
    def check_listed(self, name: str, meta: dict[str, Any]) -> None: ...
    def finished_targets(self, name: str, model_id: int, m: int, k: int
                         ) -> tuple[np.ndarray, dict[str, Any]]: ...
    def finish_targets(self, name: str, records: dict[int, dict[str, Any]]) -> None: ...
    def save_scores(self, name: str, scores: np.ndarray, info: dict[str, Any]) -> Any: ...
    def load_scores(self, name: str) -> np.ndarray: ...


def open_store(save_dir: str | os.PathLike, config: dict[str, Any]) -> StoreBackend:
    """The store at ``save_dir``: a local folder (:class:`~trax_attr.store.Store`) or a
    URL (:class:`~trax_attr.store.objstore.ObjectStore`), created if absent."""
    if is_url(save_dir):
        from .objstore import ObjectStore  # tensorstore is imported only for URL stores

        return ObjectStore(str(save_dir), config)
    from .store import Store

    return Store(save_dir, config)

