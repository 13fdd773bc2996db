"""The settings a store records: ``store.json``, their digest, and the stamp that binds
every checkpoint and experiment to them; rebuilding a lost ``store.json`` (``repair``).

``store.json`` holds the run's settings (:class:`trax_attr.Settings`), the names of the
keys given when the store was made and their digest; every checkpoint's and experiment's
``meta.json`` records that digest and those values (:meth:`SettingsRecord._stamp`), and
both are checked whenever one is read, so arrays are never combined with settings they
were not computed with. A store folder with arrays but no ``store.json`` is refused.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from ..hashing import digest
from ..settings import Settings
from .errors import StoreCorruptedError, repair_hint
from .layout import FORMAT_VERSION
from .reading import open_memmap, present, read_json
from .schema import check_store_meta
from .writes import write_json_atomic

__all__ = ["SettingsRecord"]

_SETTINGS = tuple(f.name for f in dataclasses.fields(Settings))


class SettingsRecord:
    """The part of :class:`~trax_attr.store.Store` that reads, checks and writes
    ``store.json`` (it uses the store's ``root``, ``lock`` and ``_inside``)."""

    def _digest(self) -> str:
        return digest({key: self.config[key] for key in self._keys})

    def _read_store_meta(self) -> None:
        path = self.root / "store.json"
        meta = check_store_meta(path, self._read_json(path), FORMAT_VERSION)
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

    def _read_json(self, path) -> dict[str, Any]:
        """The JSON object at ``path`` (a file of save_dir; an object of a URL store)."""
        return read_json(self._inside(path))

    def _write_json(self, path, data: dict[str, Any]) -> None:
        """Replace ``path`` by ``data``, atomically (call with the meta lock held)."""
        write_json_atomic(path, data)

    def _write_store_meta(self) -> None:
        self._write_json(self.root / "store.json", {
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

    @classmethod
    def repair(cls, root: str | os.PathLike) -> str:
        """Rewrite a lost ``store.json`` from the settings every checkpoint and experiment
        of ``root`` recorded (they must all agree); what was done, in a sentence."""
        root = Path(root)
        if present(root / "store.json"):
            raise ValueError(f"{str(root / 'store.json')!r} exists; there is nothing to "
                             "repair (delete it first only if you know it is wrong).")
        stamps, widths = {}, set()
        for part in ("models", "experiments"):
            folder = root / part
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
                if part == "models" and present(sub / "grads.npy"):
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
