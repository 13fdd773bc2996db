"""The on-disk store: versioned layout, atomic metadata, per-row progress.

Layout under ``save_dir`` (format version 1)::

    store.json                          configuration, written once
    models/<model_id>/meta.json         checkpoint fingerprint, finalized flag
    models/<model_id>/grads.npy         (n_train, k) f32  projected gradients Φ
    models/<model_id>/out_to_loss.npy   (n_train,)   f32  Q
    models/<model_id>/done.npy          (n_train,)   u1   1 once the row is on disk
    models/<model_id>/features.npy      (n_train, k) f32  Φ·A, after finalize_features
    experiments/<name>/meta.json        num_targets, model ids scored
    experiments/<name>/<model_id>_targets.npy  (n_targets, k) f32  φ of the targets
    experiments/<name>/<model_id>_done.npy     (n_targets,)   u1
    experiments/<name>/scores.npy       (n_train, n_targets) f32, after finalize_scores

Rules: every JSON file is replaced atomically (temp file + fsync + rename); every array
file is created whole under a temp name and renamed; a row is marked done only after its
values are flushed, so a crash loses at most the batch in flight. Nothing is unpickled.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["Store", "FORMAT_VERSION"]

FORMAT_VERSION = 1
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(data, handle, indent=1, sort_keys=True)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path) as handle:
            data = json.load(handle)
    except json.JSONDecodeError as err:
        raise ValueError(
            f"{path} is not valid JSON ({err}); the store's metadata is corrupted. Restore it "
            "from a backup or start a new save_dir."
        ) from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} does not hold a JSON object; the store's metadata is corrupted.")
    return data


def _publish_new(tmp: str | Path, path: Path) -> None:
    """Move ``tmp`` to ``path`` unless ``path`` exists: processes sharing a store never
    replace a file another one already created (and maybe wrote rows to)."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass
    finally:
        os.unlink(tmp)


def write_json_new(path: Path, data: dict[str, Any]) -> None:
    """Create a JSON file atomically, keeping the existing one if another process won."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as handle:
        json.dump(data, handle, indent=1, sort_keys=True)
        handle.flush()
        os.fsync(handle.fileno())
    _publish_new(tmp, path)


def _create_array(path: Path, shape: tuple[int, ...], dtype) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # A name of its own per process (not mkstemp: that would make the file 0600).
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    array = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=shape)
    array.flush()
    del array
    _publish_new(tmp, path)


def _rows_layout(path: Path) -> tuple[int, tuple[int, ...], np.dtype]:
    with open(path, "rb") as handle:
        version = np.lib.format.read_magic(handle)
        read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                       else np.lib.format.read_array_header_2_0)
        shape, fortran, dtype = read_header(handle)
        if fortran:
            raise ValueError(f"{path} is stored in Fortran order; rows cannot be streamed.")
        return handle.tell(), shape, dtype


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

    Only these bytes are written, so processes writing disjoint rows do not clobber each
    other (local or cluster file systems with POSIX write semantics).
    """
    offset, shape, dtype = _rows_layout(path)
    values = np.ascontiguousarray(values, dtype)
    if values.shape[1:] != tuple(shape[1:]) or start < 0 or start + len(values) > shape[0]:
        raise ValueError(f"rows {start}..{start + len(values)} of shape {values.shape[1:]} do "
                         f"not fit {path} of shape {shape}.")
    row = int(np.prod(shape[1:], dtype=np.int64))
    with open(path, "r+b") as handle:
        handle.seek(offset + start * row * dtype.itemsize)
        handle.write(memoryview(values.reshape(-1)).cast("B"))
        handle.flush()
        os.fsync(handle.fileno())


def open_array(path: Path, shape: tuple[int, ...], dtype, mode: str = "r+") -> np.memmap:
    """Memory-map an array file, creating it (zeros) if absent; checks shape and dtype."""
    if not path.exists():
        if mode == "r":
            raise FileNotFoundError(f"{path} does not exist.")
        _create_array(path, shape, dtype)
    try:
        array = np.lib.format.open_memmap(path, mode=mode)
    except (ValueError, OSError) as err:
        raise ValueError(
            f"{path} is not a readable .npy array ({err}); it is truncated or corrupted. "
            "Delete it to recompute it."
        ) from None
    if array.shape != tuple(shape) or array.dtype != np.dtype(dtype):
        raise ValueError(
            f"{path} holds {array.dtype}{list(array.shape)}, expected "
            f"{np.dtype(dtype)}{list(shape)}; the store was written with other settings. "
            "Use another save_dir."
        )
    return array


def check_name(kind: str, name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name) or ".." in name:
        raise ValueError(
            f"{kind}={name!r} is not a valid name: use letters, digits, '_', '-' and '.', "
            "starting with a letter or digit (it becomes a folder inside save_dir)."
        )
    return name


def check_model_id(model_id) -> int:
    if isinstance(model_id, bool) or not isinstance(model_id, (int, np.integer)) or model_id < 0:
        raise ValueError(f"model_id must be a non-negative integer, got {model_id!r}.")
    return int(model_id)


class Store:
    """Files of one TRAK run. Only this class touches disk."""

    def __init__(self, root: str | os.PathLike, config: dict[str, Any], *, writer: bool = True):
        # Several processes may open one store; only the writer records new config keys,
        # so store.json is never read-modified-written concurrently.
        self.writer = bool(writer)
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        meta_path = self.root / "store.json"
        if not meta_path.exists():
            write_json_new(meta_path, {"format": "trax_attr.store", "version": FORMAT_VERSION,
                                       "config": dict(config)})
        if meta_path.exists():
            meta = read_json(meta_path)
            if meta.get("format") != "trax_attr.store" or meta.get("version") != FORMAT_VERSION:
                raise ValueError(
                    f"{meta_path} is not a trax_attr store of format version {FORMAT_VERSION} "
                    f"(found format={meta.get('format')!r}, version={meta.get('version')!r}). "
                    "Use another save_dir."
                )
            self.config = meta.get("config", {})
            self.check_config(config)
        else:
            self.config = dict(config)
            self._write_store_meta()

    # --- configuration -------------------------------------------------------------------
    def _write_store_meta(self) -> None:
        write_json_atomic(self.root / "store.json", {
            "format": "trax_attr.store", "version": FORMAT_VERSION, "config": self.config})

    def check_config(self, config: dict[str, Any]) -> None:
        """Refuse settings that differ from the stored ones; record new keys."""
        diffs = [f"{key}: stored {self.config[key]!r}, given {value!r}"
                 for key, value in config.items()
                 if key in self.config and self.config[key] != value]
        if diffs:
            raise ValueError(
                f"save_dir {str(self.root)!r} was written with other settings ("
                + "; ".join(diffs) + "). Use the stored settings to resume, or another save_dir "
                "for a new run."
            )
        new = {key: value for key, value in config.items() if key not in self.config}
        if new and not self.writer:
            self.config.update(new)
        elif new:
            self.config.update(new)
            self._write_store_meta()

    # --- checkpoints ---------------------------------------------------------------------
    def model_dir(self, model_id: int) -> Path:
        return self.root / "models" / str(check_model_id(model_id))

    def model_ids(self) -> list[int]:
        folder = self.root / "models"
        if not folder.exists():
            return []
        return sorted(int(p.name) for p in folder.iterdir()
                      if p.name.isdigit() and (p / "meta.json").exists())

    def model_meta(self, model_id: int) -> dict[str, Any] | None:
        path = self.model_dir(model_id) / "meta.json"
        return read_json(path) if path.exists() else None

    def create_model_meta(self, model_id: int, meta: dict[str, Any]) -> dict[str, Any]:
        """Write a checkpoint's first metadata unless another process did; returns the stored."""
        write_json_new(self.model_dir(model_id) / "meta.json", meta)
        return self.model_meta(model_id)

    def array_path(self, model_id: int, name: str) -> Path:
        """Path of a checkpoint's array file (``grads``, ``out_to_loss``, ``features``...)."""
        return self.model_dir(model_id) / f"{name}.npy"

    def partial_features(self, model_id: int, n: int, k: int, *, create: bool):
        """``(path, publish)`` of features.npy under a temp name, made (zeros) if ``create``.

        Processes write their rows with :func:`write_rows`; one of them calls ``publish``.
        """
        final = self.model_dir(model_id) / "features.npy"
        tmp = final.with_name(".features.npy.partial")
        if create:
            np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n, k)).flush()

        def publish():
            os.replace(tmp, final)

        return tmp, publish

    def write_model_meta(self, model_id: int, meta: dict[str, Any]) -> None:
        write_json_atomic(self.model_dir(model_id) / "meta.json", meta)

    def model_arrays(self, model_id: int, n: int, k: int) -> dict[str, np.memmap]:
        folder = self.model_dir(model_id)
        return {
            "grads": open_array(folder / "grads.npy", (n, k), np.float32),
            "out_to_loss": open_array(folder / "out_to_loss.npy", (n,), np.float32),
            "done": open_array(folder / "done.npy", (n,), np.uint8),
        }

    def features(self, model_id: int, n: int, k: int, mode: str = "r") -> np.memmap:
        return open_array(self.model_dir(model_id) / "features.npy", (n, k), np.float32, mode)

    def new_features(self, model_id: int, n: int, k: int) -> tuple[np.memmap, callable]:
        """A fresh (n, k) array under a temp name, and the function that publishes it."""
        final = self.model_dir(model_id) / "features.npy"
        tmp = final.with_name(".features.npy.partial")
        array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n, k))

        def publish():
            array.flush()
            os.replace(tmp, final)

        return array, publish

    # --- experiments ---------------------------------------------------------------------
    def experiment_dir(self, name: str) -> Path:
        return self.root / "experiments" / check_name("exp_name", name)

    def experiment_names(self) -> list[str]:
        folder = self.root / "experiments"
        if not folder.exists():
            return []
        return sorted(p.name for p in folder.iterdir() if (p / "meta.json").exists())

    def experiment_meta(self, name: str) -> dict[str, Any] | None:
        path = self.experiment_dir(name) / "meta.json"
        return read_json(path) if path.exists() else None

    def write_experiment_meta(self, name: str, meta: dict[str, Any]) -> None:
        write_json_atomic(self.experiment_dir(name) / "meta.json", meta)

    def target_arrays(self, name: str, model_id: int, m: int, k: int) -> dict[str, np.memmap]:
        folder = self.experiment_dir(name)
        model_id = check_model_id(model_id)
        return {
            "grads": open_array(folder / f"{model_id}_targets.npy", (m, k), np.float32),
            "done": open_array(folder / f"{model_id}_done.npy", (m,), np.uint8),
        }

    def save_scores(self, name: str, scores: np.ndarray) -> Path:
        path = self.experiment_dir(name) / "scores.npy"
        tmp = path.with_name(".scores.npy.partial")
        with open(tmp, "wb") as handle:
            np.save(handle, scores, allow_pickle=False)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        return path

    def load_scores(self, name: str) -> np.ndarray:
        return np.load(self.experiment_dir(name) / "scores.npy", allow_pickle=False)
