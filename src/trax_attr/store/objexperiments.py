"""The experiments of a URL store: target rows, their records, the finished scores.

The object-store counterpart of :mod:`.experiments` (whose record-keeping it reuses:
``add_to_experiment``, ``finish_targets``, ``experiment_rows``): rows as zarr arrays
(:mod:`.objrows`), metadata written by process 0 (:class:`.objstore.ObjectStore`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from .checksums import verify_row_checks
from .errors import StoreCorruptedError
from .experiments import ExperimentFiles, refuse_unlisted
from .layout import check_model_id, check_name
from .objects import ObjectPath
from .objrows import (ObjectRowArrays, array_record, finished_key, load_finished,
                      save_finished)

__all__ = ["ObjectExperiments"]


class ObjectExperiments(ExperimentFiles):
    """The part of :class:`~trax_attr.store.objstore.ObjectStore` that holds experiments
    (it uses the store's ``objects``, ``_rows``, ``_read_optional``, ``_write_json``)."""

    def experiment_dir(self, name: str) -> ObjectPath:
        return self.root / "experiments" / check_name("exp_name", name)

    def _exp_key(self, name: str) -> str:
        return f"experiments/{check_name('exp_name', name)}/"

    def experiment_names(self) -> list[str]:
        names = set()
        for key in self.objects.list("experiments/"):
            head, _, tail = key.partition("/")
            if tail == "meta.json":
                names.add(head)
        return sorted(names)

    def experiment_meta(self, name: str) -> dict[str, Any] | None:
        from .schema import check_experiment_meta

        path = self.experiment_dir(name) / "meta.json"
        meta = self._read_optional(path)
        return None if meta is None else check_experiment_meta(path, meta, self.digest)

    def _update_experiment_meta(self, name: str,
                                update: Callable[[dict[str, Any] | None], dict[str, Any]]):
        meta = {**update(self.experiment_meta(name)), "settings": self._stamp()}
        self._write_json(self.experiment_dir(name) / "meta.json", meta)
        return meta

    def experiment_lock(self, name: str, *, shared: bool, doing: str):
        return self.lock(f"exp-{check_name('exp_name', name)}")

    def target_arrays(self, name: str, model_id: int, m: int, k: int,
                      mode: str = "r+") -> ObjectRowArrays:
        """The target rows of ``model_id`` in experiment ``name``: grads (m, k) f32, check
        (m,) u8, done (m,) u1."""
        model_id = check_model_id(model_id)
        arrays = self._rows(self._exp_key(name), {
            "grads": (f"{model_id}_targets", (m, k)), "check": (f"{model_id}_check", (m,)),
            "done": (f"{model_id}_done", (m,))}, mode,
            f"the targets of model_id={model_id} in experiment {name!r}")
        arrays.forget = lambda: self._forget(name, f"{model_id}_targets.npy")
        arrays.salt = self.row_salt(model_id, name)
        return arrays

    def check_listed(self, name: str, meta: dict[str, Any]) -> None:
        refuse_unlisted(str(self.experiment_dir(name)),
                        (key.split("/")[0] for key in self.objects.list(self._exp_key(name))),
                        meta, "objects", "under that prefix")

    def finished_targets(self, name: str, model_id: int, m: int, k: int
                         ) -> tuple[np.ndarray, dict[str, Any]]:
        """``(targets (m, k) f32, record)``: checked against their record, or the first
        time against their row checks."""
        model_id = check_model_id(model_id)
        arrays = self.target_arrays(name, model_id, m, k, mode="r")
        what = f"the targets of model_id={model_id} in experiment {name!r}"
        fix = (f"Delete the objects {str(arrays.rows['grads'].url)!r} and "
               f"{str(arrays.rows['done'].url)!r}, then score model_id={model_id} in "
               f"experiment {name!r} again.")
        targets = arrays.rows["grads"].read(0, m)
        found = array_record(targets)
        record = (self.experiment_meta(name) or {}).get("arrays", {}).get(
            f"{model_id}_targets.npy")
        if record is not None:
            if found != {"bytes": record["bytes"], "blake2b": record["blake2b"]}:
                raise StoreCorruptedError(
                    f"{what} at {arrays.rows['grads'].url!r} do not match the checksum "
                    f"recorded when they were first scored (blake2b {found['blake2b']} != "
                    f"{record['blake2b']}): they are corrupted. {fix}")
            return targets, record
        verify_row_checks(0, arrays.rows["check"].read(0, m), [targets], what, fix,
                          self.row_salt(model_id, name))
        return targets, found

    def save_scores(self, name: str, scores: np.ndarray, info: dict[str, Any]) -> ObjectPath:
        """Write the scores under a new key and record them with ``info`` (process 0)."""
        base = self._exp_key(name) + "scores"
        record = save_finished(self.objects, base, np.asarray(scores, np.float32))
        old = (self.experiment_meta(name) or {}).get("scores")
        self._update_experiment_meta(name, lambda meta: {**meta, "scores": {**record, **info}})
        if old is not None and old["blake2b"] != record["blake2b"]:  # no longer read
            self.objects.delete_prefix(finished_key(base, old) + "/")
        return self.experiment_dir(name) / "scores"

    def load_scores(self, name: str) -> np.ndarray:
        """The finished scores (n_train, n_targets) f32 of ``name``, verified as read."""
        meta = self.experiment_meta(name)
        if meta is None:
            raise ValueError(f"experiment {name!r} does not exist in {str(self.root)!r} "
                             f"(existing: {self.experiment_names()}).")
        record = meta.get("scores")
        if record is None:
            raise ValueError(f"experiment {name!r} has no scores yet; call "
                             f"finalize_scores(exp_name={name!r}) first.")
        n = self.train_set_size
        return load_finished(self.objects, self._exp_key(name) + "scores", record,
                             (n, meta["num_targets"]), np.float32,
                             f"scores of experiment {name!r}",
                             f"Call finalize_scores(exp_name={name!r}) again to recompute "
                             "them.")
