"""The experiments of a store: target rows, their records, and the finished scores.

Layout in :mod:`.layout`; the rules that every write and read follows are those of
:mod:`.store` (atomic metadata, records verified as read, readers under the shared meta
lock see the old or the new scores).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .checksums import load_array, read_verified, verify_row_checks
from .errors import StoreCorruptedError
from .layout import check_model_id, check_name, model_id_of
from .reading import open_file, open_memmap, present, read_json
from .schema import check_experiment_meta
from .writes import RowArrays, stage_array, write_json_atomic

__all__ = ["ExperimentFiles"]


class ExperimentFiles:
    """The part of :class:`~trax_attr.store.Store` that holds experiments (it uses the
    store's ``lock``, ``_inside``, ``open_array``, ``_publish`` and settings stamp)."""

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
        refuse_unlisted(str(folder), (p.name for p in folder.iterdir()), meta, "files",
                        "in that folder")

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


def refuse_unlisted(where: str, names, meta: dict[str, Any], unit: str, place: str) -> None:
    """StoreCorruptedError if ``names`` (file or object names of an experiment) hold target
    rows of model_ids that ``meta["model_ids"]`` does not list."""
    found = set()
    for name in names:
        head, _, tail = name.partition("_")
        if tail.removesuffix(".npy") in ("targets", "done", "check") \
                and model_id_of(head) is not None:
            found.add(int(head))
    stray = sorted(found - set(meta["model_ids"]))
    if stray:
        raise StoreCorruptedError(
            f"{where!r} holds target rows of model_ids {stray} that its meta.json does not "
            f"list ({meta['model_ids']}): the metadata was edited or replaced. Restore it, or "
            f"delete the {unit} of those checkpoints {place} (their targets are scored again "
            "by start_scoring_checkpoint and score).")
