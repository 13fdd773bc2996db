"""The store of a TRAK run in an object store (``s3://``, ``gs://``, ``file://``,
``memory://``): the same layout as :mod:`.layout` with arrays as zarr v3 prefixes.

Rules, and the fault each one answers (compare :mod:`.store`):

* No file locks: the processes of one jax.distributed job coordinate by collectives.
  Process 0 decides (creates the store, checks its job id) and broadcasts the verdict,
  and only process 0 writes metadata (``store.json``, ``job.json``, every ``meta.json``);
  the others hold the same value in memory (what they would have written is
  deterministic), so no two processes ever write one object.
* A job id (``TRAX_ATTR_JOB_ID``, else process 0's host name and pid) is written in
  ``job.json`` when the store is created and checked when it is opened, and again before
  every metadata write: a second, independent job pointed at the same URL is refused
  with :class:`StoreBusyError` naming the URL and the fix, instead of both overwriting
  each other's objects. A job resumed after a crash sets the id it was started with.
* Rows: chunks of whole rows, one writer per chunk (:mod:`.objrows`); values before
  done flags; a crc32c per chunk and missing chunks read as errors (:mod:`.objects`).
* Finished arrays are written under digest-named keys and recorded in the metadata write
  that marks them finished; they are verified whenever read.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from typing import Any

import numpy as np

from .errors import StoreBusyError, StoreCorruptedError
from .layout import check_model_id, check_name, model_id_of
from .locks import job_lock
from .objects import ObjectPath, Objects
from .objexperiments import ObjectExperiments
from .objrows import (ObjectRowArrays, ObjectRows, RowReader, finished_key, load_finished,
                      save_finished, write_object_rows)
from .schema import BOUND, check_model_meta
from .settings_record import SettingsRecord
from .store import Store, check_flags

__all__ = ["ObjectStore", "JOB_ENV"]

JOB_ENV = "TRAX_ATTR_JOB_ID"
_ROW_ARRAYS = {"grads": np.float32, "out_to_loss": np.float32, "check": np.uint64,
               "done": np.uint8}
_DONE_CHUNK = 1 << 20


def _job_id() -> str:
    """This job's id: ``TRAX_ATTR_JOB_ID``, else ``<host>-<pid>`` of process 0 (only
    process 0 checks it: it alone writes metadata)."""
    given = os.environ.get(JOB_ENV)
    if given:
        return check_name(JOB_ENV, given)
    return f"{socket.gethostname()}-{os.getpid()}"


class ObjectStore(SettingsRecord, ObjectExperiments):
    """The store of one TRAK run at a URL (see the module docstring).

    Args:
      url: ``memory://name``, ``file:///folder``, ``s3://bucket/prefix`` or
        ``gs://bucket/prefix`` (:func:`.objects.kvstore_spec`).
      config: the run's settings, as for :class:`~trax_attr.store.Store`.
    """

    row_salt = Store.row_salt

    def __init__(self, url: str, config: dict[str, Any]):
        import jax

        from ..parallel.hosts import broadcast_int

        self.objects = Objects(url)
        self.root = self.objects.url
        self._first = jax.process_index() == 0
        self._written: dict[str, dict] = {}  # what this process decided, if not process 0
        self.job = _job_id()
        with job_lock(contextlib.nullcontext, lambda: self._open(config), first=self._first,
                      broadcast=broadcast_int,
                      busy=f"save_dir {self.root!r} belongs to another job; process 0 of this "
                           "job says which and what to do.",
                      failed=f"process 0 of this job could not open the store {self.root!r}; "
                             "its own error says why and what to do."):
            pass
        if not self._first:
            self._read_store_meta()
        self.check_config(config)

    # --- opening: the job id ---------------------------------------------------------
    def _open(self, config: dict[str, Any]) -> bool:
        if self.objects.read_json("store.json") is None:
            self._refuse_orphans()
            self.objects.write_json("job.json", {
                "job": self.job, "host": socket.gethostname(),
                "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
            self._check_job()  # another job that created it at the same moment wins
            self.config = json.loads(json.dumps(config))
            self._keys = sorted(self.config)
            self.digest = self._digest()
            self._write_store_meta()
        else:
            self._check_job()
            self._read_store_meta()
        return True

    def _check_job(self) -> None:
        owner = self.objects.read_json("job.json") or {}
        if owner.get("job") == self.job:
            return
        raise StoreBusyError(
            f"save_dir {self.root!r} belongs to another job (job id {owner.get('job')!r}, "
            f"started {owner.get('started', '?')} on {owner.get('host', '?')}): two jobs "
            "writing one object store would overwrite each other's objects. If that job is "
            "still running, wait for it or use another save_dir. If it has stopped (finished, "
            "failed or killed) and this job resumes its work, start every process of this "
            f"job with {JOB_ENV}={owner.get('job')} (a job that sets {JOB_ENV} itself, to "
            "its cluster job name for instance, resumes without this step).")

    def _refuse_orphans(self) -> None:
        held = [name for name in ("models/", "experiments/") if self.objects.list(name)]
        if held:
            raise StoreCorruptedError(
                f"save_dir {self.root!r} holds {' and '.join(held)} but no store.json: the "
                "settings its arrays were computed with are unknown. Restore store.json from a "
                "backup, or use another save_dir.")

    # --- metadata: process 0 writes ---------------------------------------------------
    def _key(self, path) -> str:
        return str(path)[len(self.root) + 1:]

    def _read_json(self, path) -> dict[str, Any]:
        found = self._read_optional(path)
        if found is None:
            raise StoreCorruptedError(f"{str(path)!r} is missing. Restore it from a backup, "
                                      "or start a new save_dir.")
        return found

    def _read_optional(self, path) -> dict[str, Any] | None:
        found = self.objects.read_json(self._key(path))
        return self._written.get(self._key(path)) if found is None else found

    def _write_json(self, path, data: dict[str, Any]) -> None:
        key = self._key(path)
        if not self._first:
            self._written[key] = data
            return
        if key != "store.json" or self.objects.read_json(key) is not None:
            self._check_job()  # taken over by a resumed job meanwhile: stop writing
        self.objects.write_json(key, data)

    def lock(self, name: str, **_):
        """No locks: process 0 decides for its job, the job id keeps other jobs out."""
        return contextlib.nullcontext(True)

    # --- checkpoints -------------------------------------------------------------------
    def model_dir(self, model_id: int) -> ObjectPath:
        return self.root / "models" / str(check_model_id(model_id))

    def model_ids(self) -> list[int]:
        ids = {model_id_of(key.split("/")[0]) for key in self.objects.list("models/")
               if key.endswith("/meta.json") and key.count("/") == 1}
        return sorted(i for i in ids if i is not None)

    def model_meta(self, model_id: int) -> dict[str, Any] | None:
        path = self.model_dir(model_id) / "meta.json"
        meta = self._read_optional(path)
        return None if meta is None else check_model_meta(path, meta, self.digest)

    def create_model(self, model_id: int, fingerprint: str) -> dict[str, Any]:
        meta = self.model_meta(model_id)
        if meta is None:
            meta = {"fingerprint": fingerprint, "finalized": False, "settings": self._stamp()}
            self._write_json(self.model_dir(model_id) / "meta.json", meta)
        return meta

    def model_lock(self, model_id: int, *, shared: bool, doing: str):
        return self.lock(f"model-{check_model_id(model_id)}")

    def _rows(self, prefix: str, sizes: dict[str, tuple], mode: str, what: str
              ) -> ObjectRowArrays:
        arrays = ObjectRowArrays()
        arrays.rows = {name: ObjectRows(self.objects, f"{prefix}{file}", shape,
                                        _ROW_ARRAYS[name], create=mode != "r",
                                        fill_missing=name == "done")
                       for name, (file, shape) in sizes.items()}
        for name, rows in arrays.rows.items():
            arrays[name] = rows
        arrays["done"] = np.asarray(arrays.rows["done"])
        arrays.what = what
        return arrays

    def model_arrays(self, model_id: int, n: int, k: int, mode: str = "r+") -> ObjectRowArrays:
        """The row arrays of a checkpoint (see :class:`.objrows.ObjectRowArrays`)."""
        import jax

        from ..parallel.hosts import process_rows

        prefix = f"models/{check_model_id(model_id)}/"
        arrays = self._rows(prefix, {"grads": ("grads", (n, k)),
                                     "out_to_loss": ("out_to_loss", (n,)),
                                     "check": ("check", (n,)), "done": ("done", (n,))},
                            mode, f"the training rows of model_id={model_id} in {self.root!r}")
        arrays.salt = self.row_salt(model_id)
        if jax.process_count() > 1:
            arrays.owned = process_rows(n)
        return arrays

    @staticmethod
    def write_rows(arrays: ObjectRowArrays, rows: np.ndarray, values: dict[str, np.ndarray],
                   flags: np.ndarray) -> None:
        """Write rows with their checks, then their done flags (:mod:`.objrows`)."""
        if getattr(arrays, "forget", None) is not None:
            arrays.forget()
        write_object_rows(arrays, rows, values, flags)

    def rows_done(self, model_id: int, exp_name: str | None = None) -> np.ndarray:
        if exp_name is None:
            key, size = f"models/{check_model_id(model_id)}/done", self.train_set_size
        else:
            exp = self.experiment_meta(exp_name)
            if exp is None:
                return np.zeros(0, np.uint8)
            key = f"experiments/{check_name('exp_name', exp_name)}/{check_model_id(model_id)}_done"
            size = exp["num_targets"]
        if not self.objects.exists(f"{key}/zarr.json"):
            return np.zeros(0, np.uint8)
        return np.asarray(ObjectRows(self.objects, key, (size,), np.uint8, create=False,
                                     fill_missing=True))

    # --- what the finalize steps read ----------------------------------------------------
    def _row_key(self, model_id: int, name: str) -> str:
        base = f"models/{check_model_id(model_id)}/{check_name('array', name)}"
        if name in _ROW_ARRAYS:
            return base
        record = self.record(model_id, name)
        if record is None:
            raise ValueError(f"model_id={model_id} has no finished {name}; call "
                             "finalize_features() first.")
        return finished_key(base, record)

    def _open_rows(self, model_id: int, name: str, shape=None, dtype=None) -> ObjectRows:
        key = self._row_key(model_id, name)
        if shape is None:  # as stored
            meta = self.objects.read_json(f"{key}/zarr.json")
            if meta is None:
                raise StoreCorruptedError(f"{self.objects.where(key)!r} does not exist. "
                                          "Featurize the rows it holds again.")
            shape, dtype = tuple(meta["shape"]), np.dtype(meta["data_type"])
        return ObjectRows(self.objects, key, shape, dtype, create=False,
                          fill_missing=name == "done")

    def has_rows(self, model_id: int) -> bool:
        return self.objects.exists(f"models/{check_model_id(model_id)}/done/zarr.json")

    def read_rows(self, model_id: int, name: str, start: int, stop: int) -> np.ndarray:
        return self._open_rows(model_id, name).read(start, stop)

    def row_stream(self, model_id: int, name: str, shape=None, dtype=None) -> RowReader:
        return RowReader(self._open_rows(model_id, name, shape, dtype))

    def verify_rows(self, model_id: int, name: str, what: str, fix: str) -> None:
        self.row_stream(model_id, name).verify(self.record(model_id, name), what, fix)

    def missing_rows(self, model_id: int, n: int) -> tuple[list[int], int]:
        if not self.has_rows(model_id):
            return list(range(min(n, 8))), n
        done, first, count = self._open_rows(model_id, "done"), [], 0
        for start in range(0, n, _DONE_CHUNK):
            flags = done.read(start, start + _DONE_CHUNK)
            check_flags(flags, start, done.url, model_id, str(self.model_dir(model_id)))
            left = np.flatnonzero(flags == 0)
            count += left.size
            first.extend((left[: 8 - len(first)] + start).tolist())
        return first, count

    def record(self, model_id: int, name: str) -> dict | None:
        meta = self.model_meta(model_id) or {}
        return meta.get("arrays", {}).get(f"{check_name('array', name)}.npy")

    def finished(self, model_id: int, name: str, shape, dtype, mode: str = "r") -> np.ndarray:
        """A finished array of a finalized checkpoint, in memory, verified as read."""
        meta = self.model_meta(model_id)
        if meta is None or not meta["finalized"]:
            raise ValueError(f"model_id={model_id} is not finalized; call "
                             "finalize_features() first.")
        return load_finished(self.objects, f"models/{model_id}/{check_name('array', name)}",
                             self.record(model_id, name), shape, dtype,
                             f"{name} of model_id={model_id}",
                             f"Delete the prefix {str(self.model_dir(model_id))!r} and "
                             f"featurize model_id={model_id} again.")

    def finish_model(self, model_id: int, arrays: dict[str, np.ndarray],
                     records: dict[str, dict], update: dict[str, Any]) -> None:
        """Write finished ``arrays`` of ``model_id`` under new keys, then record them with
        ``records`` and ``update`` in one metadata write (process 0 only)."""
        written = {f"{name}.npy": save_finished(self.objects, f"models/{model_id}/{name}", value)
                   for name, value in arrays.items()}
        for key, file in BOUND.items():
            if key in update and file in written:
                written[file] = {**written[file], key: update[key]}
        meta = self.model_meta(model_id)
        old = meta.get("arrays", {})
        self._write_json(self.model_dir(model_id) / "meta.json", {
            **meta, **update, "arrays": {**old, **records, **written}})
        for file, record in written.items():  # the arrays replaced are no longer read
            if file in old and old[file]["blake2b"] != record["blake2b"]:
                self.objects.delete_prefix(finished_key(f"models/{model_id}/{file[:-4]}",
                                                        old[file]) + "/")
